//! Issue 17, "go beyond": the real daemon (the built binary) in hostile operating conditions. Each
//! test asserts that the healthy work goes on, checked from the fake ElevateAI's own records, and
//! prints its figures (`cargo test --test it chaos -- --nocapture`) for the note.
//! These are the short forms that run in CI.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use callferry_fake::{FakeApi, FakeOptions};

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
    drop_recordings_of(rec, prefix, n, 0.2)
}

fn drop_recordings_of(rec: &Path, prefix: &str, n: usize, seconds: f64) -> usize {
    std::fs::create_dir_all(rec).unwrap();
    for i in 0..n {
        // Distinct content per file (a tone of its own), a valid WAV header.
        let bytes =
            callferry_fake::wav_bytes(seconds, 200.0 + i as f64 + prefix.len() as f64 * 0.1);
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

/// The daemon's resident memory now and at its peak, and its open descriptors.
fn proc_figures(pid: i32) -> (u64, u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (kib("VmRSS:"), kib("VmHWM:"), fds)
}

/// `callferry run` with its open-file limit set to `nofile` (soft and hard, so it cannot raise
/// it), its log in `log`.
fn spawn_limited(cfg: &Path, log: &Path, nofile: u64) -> tokio::process::Child {
    let file = std::fs::File::create(log).unwrap();
    let mut cmd = callferry();
    cmd.arg("--config")
        .arg(cfg)
        .arg("run")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file);
    // SAFETY: only async-signal-safe setrlimit between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: nofile,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

/// Issue 17.2: 2,000 idle and 500 slow-header connections on the metrics port of a daemon limited
/// to 1,024 descriptors (the default soft limit), while recordings arrive. Before the connection
/// cap, 1,100 idle connections left no descriptor to open recordings or commit interaction ids,
/// and 900 slow ones grew the daemon from 12.5 MB to 361 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_and_slow_connections_on_the_metrics_port_does_not_stop_uploads() {
    use tokio::io::AsyncWriteExt;
    const IDLE: usize = 2000;
    const SLOW: usize = 500;
    // The test holds every client end: make room for them (the daemon gets its own limit).
    callferry::app::raise_open_file_limit();
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let scale = if lim.rlim_cur < (IDLE + SLOW + 500) as u64 {
        println!(
            "open-file limit {} here: the flood is scaled down",
            lim.rlim_cur
        );
        (lim.rlim_cur as usize).saturating_sub(500) as f64 / (IDLE + SLOW) as f64
    } else {
        1.0
    };
    let (idle_n, slow_n) = (
        (IDLE as f64 * scale) as usize,
        (SLOW as f64 * scale) as usize,
    );

    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let fake = fake().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = write_config(
        dir.path(),
        &fake.base_url(),
        &format!("[upload]\nworkers = 8\n[metrics]\nlisten = \"{port}\"\n"),
    );
    let log = dir.path().join("daemon.log");
    let mut child = spawn_limited(&cfg, &log, 1024);
    let pid = child.id().unwrap() as i32;
    poll_for("/healthz before the flood", || async {
        (healthz(port).await == Some(200)).then_some(())
    })
    .await;
    let (rss_before, _, fds_before) = proc_figures(pid);

    // The flood: idle connections that never send a byte, then slow ones that send a header
    // line now and then and never finish.
    let mut idle = Vec::new();
    let mut refused_connects = 0;
    for _ in 0..idle_n {
        match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(port))
            .await
        {
            Ok(Ok(s)) => idle.push(s),
            _ => refused_connects += 1,
        }
        // A listener that stopped accepting (out of descriptors) leaves connects hanging: that
        // is the failure; do not spend 2 s on each of the rest.
        assert!(
            refused_connects < 20,
            "the metrics port stopped accepting after {} connections",
            idle.len()
        );
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let mut slow = tokio::task::JoinSet::new();
    for i in 0..slow_n {
        let stop = stop.clone();
        slow.spawn(async move {
            let Ok(Ok(mut s)) =
                tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(port))
                    .await
            else {
                return;
            };
            if s.write_all(b"GET /metrics HTTP/1.1\r\n").await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                let line = format!("X-Slow-{i}: {}\r\n", "a".repeat(100));
                if s.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }

    // While the flood holds: recordings arrive and are uploaded, /healthz answers.
    let started = Instant::now();
    let files = drop_recordings(&rec, "flood", 50) as u64;
    let mut peak_fds = 0;
    let mut peak_rss = 0;
    let start = Instant::now();
    loop {
        let (rss, _, fds) = proc_figures(pid);
        peak_fds = peak_fds.max(fds);
        peak_rss = peak_rss.max(rss);
        if fake.counters().uploads_stored >= files {
            break;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "the daemon exited ({st}) during the flood:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            start.elapsed() < DEADLINE * 2,
            "{} of {files} uploaded during the flood:\n{}",
            fake.counters().uploads_stored,
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let uploaded_in = started.elapsed();
    let health_start = Instant::now();
    poll_for("/healthz to answer during the flood", || async {
        (healthz(port).await == Some(200)).then_some(())
    })
    .await;
    let health_after = health_start.elapsed();
    let (rss, hwm, fds) = proc_figures(pid);
    peak_fds = peak_fds.max(fds);
    peak_rss = peak_rss.max(rss);
    stop.cancel();
    while slow.join_next().await.is_some() {}
    drop(idle);

    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let st = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert_eq!(st.code(), Some(0), "{st}");
    assert_each_once(&fake, files);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("Too many open files"), "{text}");
    let refusal_lines = text.matches("too many connections open").count();
    println!(
        "metrics flood ({idle_n} idle + {slow_n} slow-header connections, nofile 1024, {refused_connects} connects timed out): \
         {files} recordings uploaded in {:.1}s, /healthz 200 after {:.1}s, \
         RSS {:.1} MB before, peak {:.1} MB (VmHWM {:.1} MB), descriptors {fds_before} before, peak {peak_fds}, \
         {} log lines ({refusal_lines} about refused connections)",
        uploaded_in.as_secs_f64(),
        health_after.as_secs_f64(),
        rss_before as f64 / 1024.0,
        peak_rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        text.lines().count()
    );
    assert!(
        peak_fds < fds_before + callferry::monitor::MAX_CONNECTIONS + 64,
        "descriptors: {fds_before} before, {peak_fds} during the flood"
    );
    assert!(hwm < 128 * 1024, "peak RSS {hwm} KiB");
}

/// `ulimit -n 128` with 64 workers: descriptors run short (each upload holds a recording and a
/// socket). Uploads must slow down, not burn declares or fail: every recording is uploaded, once,
/// on one interaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ulimit_n_128_with_64_workers_uploads_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let fake = fake().await;
    // Slow uploads (about 0.5 s each): all 64 workers hold a recording and a socket at once.
    fake.set_upload_rate(Some(64_000));
    // An EMFILE is neither the job's fault nor the API's: it holds the workers back without
    // counting an attempt, so two attempts are room enough. What this checks is that descriptors
    // running short never cost an attempt, a second declare or a lost file.
    let cfg = write_config(
        dir.path(),
        &fake.base_url(),
        "[upload]\nworkers = 64\nmax_attempts = 2\n",
    );
    let log = dir.path().join("daemon.log");
    let mut child = spawn_limited(&cfg, &log, 128);
    let pid = child.id().unwrap() as i32;
    let files = drop_recordings_of(&rec, "nofile", 300, 2.0) as u64;
    let started = Instant::now();
    let mut peak_fds = 0;
    loop {
        peak_fds = peak_fds.max(proc_figures(pid).2);
        if fake.counters().uploads_stored >= files {
            break;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "the daemon exited ({st}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            started.elapsed() < DEADLINE * 4,
            "{} of {files} uploaded with nofile 128; counters {:?}:\n{}",
            fake.counters().uploads_stored,
            fake.counters(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let st = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert_eq!(st.code(), Some(0), "{st}");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let emfile_lines = text.matches("Too many open files").count();
    if std::env::var_os("CALLFERRY_SHOW_LOG").is_some() {
        for l in text.lines().filter(|l| l.contains("Too many open files")) {
            println!("{l}");
        }
    }
    let c = fake.counters();
    println!(
        "nofile 128, 64 workers: {files} recordings uploaded in {:.1}s with {} declares, peak {peak_fds} descriptors, \
         {} log lines ({emfile_lines} mention EMFILE)",
        took.as_secs_f64(),
        c.declares,
        text.lines().count()
    );
    assert_each_once(&fake, files);
}

/// Issue 17.13: with a short `WatchdogSec` the pings came a whole `WatchdogSec` apart (one late
/// tick from a restart). Here 4 s: pings should come about every 2 s, while recordings upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_pings_come_at_about_half_a_short_watchdogsec() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let fake = fake().await;
    let cfg = write_config(dir.path(), &fake.base_url(), "");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let log = dir.path().join("daemon.log");
    let mut d = Daemon::spawn(
        &cfg,
        &log,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "4000000"),
        ],
    );
    let files = drop_recordings(&rec, "wd", 10) as u64;
    let pings = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let mut at = Vec::new();
        let mut buf = [0u8; 4096];
        while at.len() < 6 && start.elapsed() < DEADLINE {
            if let Ok(n) = sock.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "WATCHDOG=1")
            {
                at.push(Instant::now());
            }
        }
        at
    })
    .await
    .unwrap();
    wait_stored(&fake, files, || d.exited().map(|st| st.to_string())).await;
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(DEADLINE).await.code(), Some(0));
    assert!(pings.len() >= 6, "{} pings in {DEADLINE:?}", pings.len());
    // The first ping comes at start-up; the gaps after it are the schedule.
    let mut gaps: Vec<f64> = pings
        .windows(2)
        .skip(1)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    gaps.sort_by(f64::total_cmp);
    let median = gaps[gaps.len() / 2];
    println!("WatchdogSec=4s: gaps between pings {gaps:.2?} s (median {median:.2} s)");
    // About 2 s. The old schedule gave 2 s with, now and then, a whole 4 s (a restart under
    // systemd); that is pinned down by `health`'s unit test. A median, so one late tick on a
    // loaded machine does not decide it here.
    assert!(
        median < 3.0,
        "median gap {median:.2} s with WatchdogSec=4s: {gaps:?}"
    );
}

/// Issue 17.6's condition: another process holds a read transaction on the queue (a `list`
/// streamed into a pager, a backup, `sqlite3` left open) while recordings arrive and
/// `after_upload = "delete"` needs the uploaded state durable before it deletes. The uploads and
/// deletes must go on at their usual pace (before the queue's fix, a checkpoint waited on the
/// reader: 7 of 20 uploaded in 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_holding_the_database_does_not_stall_uploads_or_deletes() {
    use sqlx::{ConnectOptions, Connection};
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let fake = fake().await;
    let cfg = write_config(
        dir.path(),
        &fake.base_url(),
        "[after_upload]\naction = \"delete\"\n",
    );
    let log = dir.path().join("daemon.log");
    let mut d = Daemon::spawn(&cfg, &log, &[]);
    d.wait_log("callferry running").await;
    let db = dir.path().join("state/queue.db");
    let mut reader = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&db)
        .read_only(true)
        .connect()
        .await
        .unwrap();
    let mut tx = reader.begin().await.unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    // The read transaction now pins a snapshot until it ends.
    let started = Instant::now();
    let files = drop_recordings(&rec, "held", 20) as u64;
    wait_stored(&fake, files, || d.exited().map(|st| st.to_string())).await;
    poll_for("the uploaded recordings to be deleted", || async {
        let left = std::fs::read_dir(&rec).map_or(0, |d| d.count());
        (left == 0).then_some(())
    })
    .await;
    let took = started.elapsed();
    tx.rollback().await.unwrap();
    reader.close().await.unwrap();
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(DEADLINE).await.code(), Some(0));
    assert_each_once(&fake, files);
    println!(
        "a reader holding a snapshot ({seen} jobs): {files} recordings uploaded and deleted in {:.1}s",
        took.as_secs_f64()
    );
}
