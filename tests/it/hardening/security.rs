//! Security: the token appears nowhere; recordings are only read; the database is
//! private.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Output;

use callferry::queue::State;
use callferry_fake::{Endpoint, FakeApi, FakeOptions, Fault};

use super::proc::{Daemon, ShowLogOnPanic, callferry, queue_when_ready, write_config};
use crate::helpers::*;

const SECRET: &str = "tok-S3CR3T-5b9e7f0d2c41a8";

async fn run_cli(cfg: &Path, args: &[&str]) -> Output {
    callferry()
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env("RUST_LOG", "trace")
        .output()
        .await
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_appears_in_no_log_error_output_or_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    // The service first rejects our token (401 pause), then accepts it.
    let fake = FakeApi::start(FakeOptions {
        token: "some-other-token".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{SECRET}\n")).unwrap();
    let base = crate::helpers::config_text(&fake.base_url(), dir.path(), "").replace(
        &format!("token = \"{TOKEN}\""),
        &format!("token_file = \"{}\"", token_file.display()),
    );
    let cfg = dir.path().join("callferry.toml");
    std::fs::write(&cfg, &base).unwrap();
    let log = dir.path().join("daemon.log");
    let mut outputs: Vec<(String, String)> = Vec::new();

    let mut d = Daemon::spawn(&cfg, &log, &[("RUST_LOG", "trace")]);
    d.wait_log("callferry running").await;
    for i in 0..3 {
        std::fs::write(rec.join(format!("s{i}.wav")), wav(0.5)).unwrap();
    }
    d.wait_log("the API rejected the token").await;
    // The pause reaches the database (where `status` reads it) a moment after the log line.
    let paused = poll_for("status to show the pause", || async {
        let t = text(&run_cli(&cfg, &["status", "--json"]).await);
        t.contains("API token rejected").then_some(t)
    })
    .await;
    outputs.push(("status --json while paused".into(), paused));
    let o = run_cli(&cfg, &["check-config", "--online"]).await;
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    outputs.push(("check-config --online, token rejected".into(), text(&o)));

    // Errors of every kind while the token is in use: 5xx, a reset, a proxy's HTML page.
    fake.push_fault(Endpoint::Declare, Fault::Status(503));
    fake.push_fault(Endpoint::Declare, Fault::HtmlError);
    fake.push_fault(Endpoint::Upload, Fault::ResetBeforeStore);
    fake.push_fault(Endpoint::Upload, Fault::Status(500));
    fake.set_token(SECRET);
    let q = queue_when_ready(&dir.path().join("state/queue.db")).await;
    eventually("all three uploaded", || async {
        q.counts().await.unwrap().uploaded == 3
    })
    .await;
    for args in [
        &["status", "--json"][..],
        &["status"],
        &["list", "--json"],
        &["list"],
        &["check-config", "--online"],
    ] {
        let o = run_cli(&cfg, args).await;
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", text(&o));
        outputs.push((args.join(" "), text(&o)));
    }
    // A crash (kill -9), then a restart and a graceful stop.
    d.kill9().await;
    d.wait(DEADLINE).await;
    let mut d = Daemon::spawn(&cfg, &log, &[("RUST_LOG", "trace")]);
    d.wait_log("callferry running").await;
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(DEADLINE).await.code(), Some(0));
    q.close().await;

    // Configuration errors around an inline token.
    for (what, cfg_text) in [
        (
            "unknown key",
            format!("[api]\ntoken = \"{SECRET}\"\ntokn = \"{SECRET}\"\n"),
        ),
        (
            "broken TOML on the token's line",
            format!("[api]\ntoken = \"{SECRET}\" x\n"),
        ),
        (
            "wrong type",
            format!("[api]\ntoken = \"{SECRET}\"\nstall_timeout = 5\n"),
        ),
        (
            "insecure base URL",
            format!(
                "[api]\ntoken = \"{SECRET}\"\nbase_url = \"http://{SECRET}.example/v1\"\n[watch]\npaths = [\"/x\"]\n"
            ),
        ),
    ] {
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, cfg_text).unwrap();
        let o = run_cli(&p, &["run"]).await;
        assert_eq!(o.status.code(), Some(78), "{what}: {}", text(&o));
        outputs.push((format!("config error: {what}"), text(&o)));
    }
    // The same token through the environment.
    let o = callferry()
        .arg("--config")
        .arg(dir.path().join("bad.toml"))
        .arg("check-config")
        .env("CALLFERRY_API__TOKEN", SECRET)
        .env("CALLFERRY_UPLOAD__WORKERS", "many")
        .env("RUST_LOG", "trace")
        .output()
        .await
        .unwrap();
    outputs.push(("config error from the environment".into(), text(&o)));

    // The verdict.
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("TRACE"),
        "the daemon logged at trace level"
    );
    assert!(
        !log_text.contains('\u{1b}'),
        "no terminal escape codes in a log file"
    );
    assert!(
        !log_text.contains(SECRET),
        "the token is in the trace log:\n{}",
        log_text
            .lines()
            .filter(|l| l.contains(SECRET))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
    for (what, out) in &outputs {
        assert!(!out.contains(SECRET), "the token is in `{what}`:\n{out}");
    }
    let state = dir.path().join("state");
    let mut checked = 0;
    for e in std::fs::read_dir(&state).unwrap().flatten() {
        let bytes = std::fs::read(e.path()).unwrap();
        let found = bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes());
        assert!(!found, "the token is in {}", e.path().display());
        checked += 1;
    }
    assert!(
        checked >= 2,
        "the database (and its -wal or lock) were checked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_its_journal_and_lock_are_private_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rec")).unwrap();
    let fake = FakeApi::start(FakeOptions {
        token: TOKEN.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let cfg = write_config(dir.path(), &fake.base_url(), "");
    let log = dir.path().join("daemon.log");
    let mut cmd = callferry();
    cmd.arg("--config")
        .arg(&cfg)
        .arg("run")
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: umask(2) is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let _show = ShowLogOnPanic(log.clone());
    std::fs::write(dir.path().join("rec/a.wav"), wav(0.5)).unwrap();
    let db = dir.path().join("state/queue.db");
    let q = queue_when_ready(&db).await;
    eventually("the upload", || async {
        q.list(None, 10)
            .await
            .unwrap()
            .first()
            .is_some_and(|j| j.state == State::Uploaded)
    })
    .await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.path().join("state")), 0o700, "state folder");
    for e in std::fs::read_dir(dir.path().join("state"))
        .unwrap()
        .flatten()
    {
        assert_eq!(mode(&e.path()), 0o600, "{} is private", e.path().display());
    }
    for suffix in ["", "-wal", "-shm", ".lock"] {
        let p = dir.path().join(format!("state/queue.db{suffix}"));
        assert!(p.exists(), "{} exists", p.display());
    }
    q.close().await;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().await.unwrap().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recordings_are_only_read_never_modified() {
    let mut app = TestApp::start("").await;
    let bytes = wav(1.0);
    let p = app.rec.join("ro.wav");
    std::fs::write(&p, &bytes).unwrap();
    // Read-only, as a recorder's files often are to the callferry user.
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
    let before = std::fs::metadata(&p).unwrap();
    let job = app.wait_state(&p, "uploaded").await;
    app.assert_uploaded_once(&job, &bytes);
    app.stop().await;
    let after = std::fs::metadata(&p).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), bytes, "content unchanged");
    // ctime moves on any write, chmod, chown or rename: it did not.
    assert_eq!(
        (after.mtime(), after.mtime_nsec()),
        (before.mtime(), before.mtime_nsec())
    );
    assert_eq!(
        (after.ctime(), after.ctime_nsec()),
        (before.ctime(), before.ctime_nsec()),
        "no write, chmod or rename"
    );
    assert_eq!(after.mode(), before.mode());
    assert_eq!(after.ino(), before.ino());
}
