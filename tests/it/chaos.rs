//! Issue 17, "go beyond": the real daemon (the built binary) in hostile operating conditions. Each
//! test asserts that the healthy work goes on, checked from the fake ElevateAI's own records, and
//! prints its figures (`cargo test --test it chaos -- --nocapture`) for the note.
//! These are the short forms that run in CI.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use callferry::fake::{FakeApi, FakeOptions};

use crate::hardening::proc::{Daemon, callferry, write_config};
use crate::helpers::*;

async fn fake() -> FakeApi {
    FakeApi::start(FakeOptions {
        token: TOKEN.into(),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Drops `n` distinct recordings into the watched folder; returns their total.
fn drop_recordings(rec: &Path, prefix: &str, n: usize) -> usize {
    std::fs::create_dir_all(rec).unwrap();
    for i in 0..n {
        // Distinct content per file (a tone of its own), a valid WAV header.
        let bytes = callferry::demo::wav_bytes(0.2, 200.0 + i as f64 + prefix.len() as f64 * 0.1);
        let tmp = rec.join(format!(".{prefix}-{i}.wav.part"));
        std::fs::write(&tmp, &bytes).unwrap();
        std::fs::rename(&tmp, rec.join(format!("{prefix}-{i}.wav"))).unwrap();
    }
    n
}

/// Polls until the fake has stored `n` uploads, failing early if the daemon exits.
async fn wait_stored(fake: &FakeApi, n: u64, mut exited: impl FnMut() -> Option<String>) {
    let start = Instant::now();
    loop {
        let c = fake.counters();
        if c.uploads_stored >= n {
            return;
        }
        if let Some(why) = exited() {
            panic!(
                "the daemon exited ({why}) with {} of {n} stored",
                c.uploads_stored
            );
        }
        assert!(
            start.elapsed() < DEADLINE * 2,
            "{} of {n} uploads stored after {:?}",
            c.uploads_stored,
            DEADLINE * 2
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every stored interaction got its audio exactly once, and nothing was declared twice.
fn assert_each_once(fake: &FakeApi, files: u64) {
    let c = fake.counters();
    assert_eq!(c.uploads_stored, files, "{c:?}");
    assert_eq!(c.declares, files, "one declare per recording: {c:?}");
    for i in fake.interactions() {
        assert!(
            i.uploads.iter().filter(|u| u.stored).count() <= 1,
            "{} stored twice",
            i.id
        );
    }
}

fn log_lines(log: &Path) -> usize {
    std::fs::read_to_string(log).map_or(0, |t| t.lines().count())
}

/// The write end of a pipe whose reader is gone (`callferry run 2>&1 | head -1` once `head` has
/// its line).
fn closed_pipe() -> Stdio {
    crate::cli::closed_pipe()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_and_stderr_do_not_stop_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let fake = fake().await;
    let cfg = write_config(dir.path(), &fake.base_url(), "[log]\nlevel = \"debug\"\n");
    let mut child = callferry()
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .stdin(Stdio::null())
        .stdout(closed_pipe())
        .stderr(closed_pipe())
        .spawn()
        .unwrap();
    let files = drop_recordings(&rec, "closed", 20) as u64;
    let started = Instant::now();
    wait_stored(&fake, files, || {
        child.try_wait().unwrap().map(|st| st.to_string())
    })
    .await;
    println!(
        "closed stdout+stderr, log level debug: {files} recordings uploaded in {:.1}s, daemon alive",
        started.elapsed().as_secs_f64()
    );
    // SAFETY: signalling our own child.
    assert_eq!(
        unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) },
        0
    );
    let st = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert_eq!(st.code(), Some(0), "{st}");
    assert_each_once(&fake, files);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_token_file_and_the_log_level_and_the_daemon_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let fake = fake().await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "a-stale-token\n").unwrap();
    let config = |level: &str| {
        config_text(
            &fake.base_url(),
            dir.path(),
            // An hour between re-checks: only the SIGHUP can resume the uploads in time.
            &format!("[api]\npause_recheck = \"1h\"\n[log]\nlevel = \"{level}\"\n"),
        )
        .replace(
            &format!("token = \"{TOKEN}\""),
            &format!("token_file = \"{}\"", token_file.display()),
        )
    };
    let cfg = dir.path().join("callferry.toml");
    std::fs::write(&cfg, config("warn")).unwrap();
    let log = dir.path().join("daemon.log");
    let mut d = Daemon::spawn(&cfg, &log, &[]);
    let files = drop_recordings(&rec, "hup", 3) as u64;
    poll_for("the daemon to be paused by the 401", || async {
        (fake.counters().unauthorized > 0).then_some(())
    })
    .await;
    assert!(d.exited().is_none());
    let quiet = d.log_text();
    assert!(!quiet.contains(" INFO "), "level warn: {quiet}");

    // The operator fixes the token file and the level, then `systemctl reload callferry`.
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    std::fs::write(&cfg, config("info")).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("SIGHUP: log level set").await;
    d.wait_log("SIGHUP: token re-read").await;
    wait_stored(&fake, files, || d.exited().map(|st| st.to_string())).await;
    d.wait_log("the API accepts the token again").await;
    let text = d.log_text();
    assert!(
        !text.contains("a-stale-token"),
        "a token in the log: {text}"
    );
    assert!(!text.contains(TOKEN), "a token in the log: {text}");

    // A broken config on SIGHUP is reported and changes nothing.
    std::fs::write(&cfg, config("inof")).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("the configuration has an error").await;
    let more = drop_recordings(&rec, "after", 2) as u64;
    wait_stored(&fake, files + more, || d.exited().map(|st| st.to_string())).await;
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(DEADLINE).await.code(), Some(0));
    if std::env::var_os("CALLFERRY_SHOW_LOG").is_some() {
        println!("{}", d.log_text());
    }
    assert_each_once(&fake, files + more);
    println!(
        "SIGHUP: {} recordings uploaded, {} log lines, the daemon never stopped",
        files + more,
        log_lines(&log)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_twice_then_sigint_stop_gracefully_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let fake = fake().await;
    // ~1 s per upload: the signals land while both workers are mid-transfer.
    fake.set_upload_rate(Some(40_000));
    let cfg = write_config(
        dir.path(),
        &fake.base_url(),
        "[upload]\nworkers = 2\nshutdown_grace = \"20s\"\n",
    );
    let log = dir.path().join("daemon.log");
    let mut d = Daemon::spawn(&cfg, &log, &[]);
    d.wait_log("callferry running").await;
    let files = drop_recordings(&rec, "term", 6) as u64;
    poll_for("two uploads in flight", || async {
        (fake.counters().bytes_received > 0).then_some(())
    })
    .await;
    d.signal(libc::SIGTERM);
    d.wait_log("SIGTERM received").await;
    d.signal(libc::SIGTERM);
    d.wait_log("already stopping").await;
    assert_eq!(d.wait(DEADLINE).await.code(), Some(0), "{}", d.log_text());
    let after_term = fake.counters().uploads_stored;
    assert!(after_term >= 1, "the in-flight uploads finished");

    fake.set_upload_rate(None);
    let mut d = Daemon::spawn(&cfg, &log, &[]);
    wait_stored(&fake, files, || d.exited().map(|st| st.to_string())).await;
    d.signal(libc::SIGINT);
    d.wait_log("SIGINT received").await;
    assert_eq!(d.wait(DEADLINE).await.code(), Some(0));
    assert_each_once(&fake, files);
    println!(
        "SIGTERM x2 during uploads: {after_term} in-flight finished, exit 0; restart + SIGINT: all {files} uploaded once"
    );
}
