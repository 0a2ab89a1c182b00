//! The recorder's end-of-call hook (`callferry enqueue --now`): the built binary writes a request
//! into the drop folder (as an unprivileged user where the test runs as root), the daemon takes it.
//! Checked from the fake's own records of the declares it received.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::json;

use crate::helpers::*;

/// An unprivileged user, and a group that is nobody's: the recorder's user and `callferry-hook`.
const UID: u32 = 65534;
const GID: u32 = 4242;

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A drop folder as the package makes it: owned by the daemon's user (here the test's), group
/// `GID`, mode 3730 (the group may create files, not list them nor touch others').
fn hook_folder() -> (tempfile::TempDir, PathBuf) {
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = base.path().join("hook");
    std::fs::create_dir(&dir).unwrap();
    if is_root() {
        std::os::unix::fs::chown(&dir, None, Some(GID)).unwrap();
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o3730)).unwrap();
    (base, dir)
}

fn config(dir: &Path, extra: &str) -> String {
    format!("[watch]\nhook_dir = \"{}\"\n{extra}", dir.display())
}

/// The built binary, where `UID` can run it: in place, or (a build in a folder only root may
/// enter, as a CI checkout in a private temporary folder) linked or copied into `spare`.
fn callferry_for_others(spare: &Path) -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_callferry"));
    let runs = Command::new(&built)
        .arg("--version")
        .uid(UID)
        .gid(GID)
        .output()
        .is_ok_and(|o| o.status.success());
    if runs || !is_root() {
        return built;
    }
    let there = spare.join("callferry");
    if !there.exists() && std::fs::hard_link(&built, &there).is_err() {
        std::fs::copy(&built, &there).unwrap();
    }
    there
}

/// Runs `callferry enqueue --now ARGS` without a shell, as `UID`:`GID` when `unprivileged`.
fn hook(dir: &Path, args: &[&str], unprivileged: bool) -> Output {
    let bin = if unprivileged {
        callferry_for_others(dir.parent().unwrap())
    } else {
        PathBuf::from(env!("CARGO_BIN_EXE_callferry"))
    };
    let mut c = Command::new(bin);
    c.args(["enqueue", "--now", "--hook-dir"])
        .arg(dir)
        .args(args)
        .env_remove("CALLFERRY_CONFIG")
        .env("CALLFERRY_HOOK_DIR", "/nonexistent");
    if unprivileged {
        // std drops the supplementary groups too (setgroups(0) before setuid, as root).
        c.uid(UID).gid(GID);
    }
    c.output().unwrap()
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}: {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn requests_left(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// The hook as the recorder's user: a caller id built to run a command if anything put it through
/// a shell arrives byte for byte in the declare, and runs nothing. Once straight (argv), once the
/// way Asterisk's MixMonitor runs it (`sh -c` with the value quoted by SHELL_QUOTE), once
/// %-encoded as FreeSWITCH's url_encode gives it. The watcher's settle is 10 minutes: what is
/// uploaded came through the hook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hook_as_the_recorders_user_carries_the_call_byte_for_byte() {
    if !is_root() {
        eprintln!("skipped: needs root to run the hook as another user (CI runs as root)");
        return;
    }
    let (_base, dir) = hook_folder();
    let mut app = TestApp::start(&config(
        &dir,
        "settle = \"10m\"\n[declare]\nsend_metadata = true\n",
    ))
    .await;
    app.fake.set_explore(true);
    // The recorder's user must reach its own recordings.
    for d in [app.dir.path(), app.rec.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let canary = app.dir.path().join("canary");
    let evil = format!(
        "';$(touch {c})'`touch {c}`\"$(touch {c})\"",
        c = canary.display()
    );
    let names = ["direct.wav", "shell.wav", "encoded.wav"];
    let paths: Vec<PathBuf> = names.iter().map(|n| app.drop_file(n, &wav(0.3))).collect();

    let o = hook(
        &dir,
        &[
            "--external-id",
            &evil,
            "--meta",
            &format!("caller={evil}"),
            "--meta",
            "agent.extension=1001",
            paths[0].to_str().unwrap(),
        ],
        true,
    );
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("requested"));

    // Asterisk's SHELL_QUOTE: the value in single quotes, each ' as '\''.
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let bin = callferry_for_others(dir.parent().unwrap());
    let line = format!(
        "{bin} enqueue --now --hook-dir {dir} --external-id {id} --meta caller={id} {file}",
        bin = quote(bin.to_str().unwrap()),
        dir = dir.display(),
        id = quote(&evil),
        file = quote(paths[1].to_str().unwrap()),
    );
    let o = Command::new("/bin/sh")
        .args(["-c", &line])
        .uid(UID)
        .gid(GID)
        .output()
        .unwrap();
    ok(&o);

    let encoded: String = evil
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let line = format!(
        "{bin} enqueue --now --urlencoded --hook-dir {dir} --external-id {e} --meta caller={e} {file}",
        bin = quote(bin.to_str().unwrap()),
        dir = dir.display(),
        e = encoded,
        file = paths[2].display(),
    );
    let o = Command::new("/bin/sh")
        .args(["-c", &line])
        .uid(UID)
        .gid(GID)
        .output()
        .unwrap();
    ok(&o);

    for p in &paths {
        app.wait_state(p, "uploaded").await;
    }
    for name in names {
        let bodies = declare_body_of(&app, name);
        assert_eq!(bodies.len(), 1, "{name}: one declare: {bodies:?}");
        assert_eq!(bodies[0]["externalIdentifier"], evil.as_str(), "{name}");
        assert_eq!(bodies[0]["metadata"]["caller"], evil.as_str(), "{name}");
    }
    assert_eq!(
        declare_body_of(&app, "direct.wav")[0]["metadata"]["agent"],
        json!({ "extension": "1001" })
    );
    assert!(!canary.exists(), "a value was run as a command");
    eventually("the requests removed", || async {
        requests_left(&dir).is_empty()
    })
    .await;
    app.stop().await;
}

/// A file outside the watched folders, a link out of them, a `..` path, a malformed request and
/// one with a field of its own: each refused with a warning that says why, and removed. Nothing
/// reaches the service.
#[tokio::test]
async fn bad_requests_are_refused_with_the_reason_and_removed() {
    let logs = Logs::default();
    let _guard = logs.install();
    let (_base, dir) = hook_folder();
    let mut app = TestApp::start(&config(&dir, "")).await;
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.wav");
    std::fs::write(&secret, wav(0.3)).unwrap();
    std::os::unix::fs::symlink(&secret, app.rec.join("link.wav")).unwrap();

    ok(&hook(&dir, &[secret.to_str().unwrap()], false));
    ok(&hook(
        &dir,
        &[app.rec.join("link.wav").to_str().unwrap()],
        false,
    ));
    let dotdot = format!("{}/../{}", app.rec.display(), "x.wav");
    std::fs::write(
        dir.join("dotdot.req"),
        json!({"version": 1, "path": dotdot}).to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("garbage.req"), b"{oops").unwrap();
    std::fs::write(
        dir.join("extra.req"),
        json!({"version": 1, "path": secret, "command": "rm -rf /"}).to_string(),
    )
    .unwrap();

    eventually("every request refused and removed", || async {
        requests_left(&dir).is_empty()
    })
    .await;
    for (why, n) in [
        ("is not inside a watched folder", 1),
        ("symbolic link", 1),
        ("contains `..`", 1),
        ("not a valid request", 2),
        ("unknown field `command`", 1),
    ] {
        assert_eq!(
            logs.count("WARN", why),
            n,
            "{why}:\n{}",
            logs.lines().join("\n")
        );
    }
    assert!(app.fake.interactions().is_empty());
    assert!(app.jobs().await.is_empty());
    let refused = logs.count("WARN", "refused the recorder's request");
    assert!(refused >= 5, "{refused}");
    assert_eq!(app.handle.metrics.hook_requests("refused"), refused as u64);
    assert_eq!(app.handle.metrics.hook_requests("attached"), 0);
    app.stop().await;
}

/// Requests written while the daemon is stopped are taken at its next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_written_while_stopped_are_taken_at_start() {
    let (_base, dir) = hook_folder();
    let mut app = TestApp::start(&config(&dir, "settle = \"10m\"\n")).await;
    app.stop().await;
    let p = app.drop_file("while-down.wav", &wav(0.3));
    ok(&hook(
        &dir,
        &["--external-id", "call-77", p.to_str().unwrap()],
        false,
    ));
    assert_eq!(requests_left(&dir).len(), 1);
    app.restart().await;
    app.wait_state(&p, "uploaded").await;
    let bodies = declare_body_of(&app, "while-down.wav");
    assert_eq!(bodies.len(), 1);
    assert_eq!(bodies[0]["externalIdentifier"], "call-77");
    assert!(requests_left(&dir).is_empty());
    app.stop().await;
}

/// The watcher and the hook finding the same recording are one job and one declare: a job the
/// watcher queued (here waiting for a sidecar) takes the hook's id and goes at once; a request
/// after the declare is a warning and changes nothing.
#[tokio::test]
async fn hook_and_watcher_are_one_job_and_one_declare() {
    let logs = Logs::default();
    let _guard = logs.install();
    let (_base, dir) = hook_folder();
    let mut app = TestApp::start(&config(&dir, "sidecar_wait = \"10m\"\n")).await;
    let p = app.drop_file("both.wav", &wav(0.3));
    let queued = poll_for("the watcher queued it", || async { app.job_for(&p).await }).await;
    ok(&hook(
        &dir,
        &["--external-id", "pbx-1", p.to_str().unwrap()],
        false,
    ));
    let job = app.wait_state(&p, "uploaded").await;
    assert_eq!(job.id, queued.id, "the hook attached to the watcher's job");
    assert_eq!(job.external_id.as_deref(), Some("pbx-1"));
    assert_eq!(declare_body_of(&app, "both.wav").len(), 1);

    ok(&hook(
        &dir,
        &["--external-id", "pbx-2", p.to_str().unwrap()],
        false,
    ));
    eventually("the late request removed", || async {
        requests_left(&dir).is_empty()
    })
    .await;
    assert_eq!(logs.count("WARN", "came after this recording's declare"), 1);
    let m = &app.handle.metrics;
    assert_eq!(
        (m.hook_requests("attached"), m.hook_requests("too_late")),
        (1, 1),
        "callferry_hook_requests_total counts each outcome"
    );
    let bodies = declare_body_of(&app, "both.wav");
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert_eq!(bodies[0]["externalIdentifier"], "pbx-1");

    // The other order: the hook first, the watcher (sidecar wait and all) finding it after.
    let q = app.drop_file("hook-first.wav", &wav(0.3));
    ok(&hook(
        &dir,
        &["--external-id", "pbx-3", q.to_str().unwrap()],
        false,
    ));
    let job = app.wait_state(&q, "uploaded").await;
    assert_eq!(job.external_id.as_deref(), Some("pbx-3"));
    // A file dropped later, with the same settle, is queued by the watcher no sooner than it
    // has judged the earlier one.
    let marker = app.drop_file("marker.wav", &wav(0.3));
    poll_for("the watcher queued the marker", || async {
        app.job_for(&marker).await
    })
    .await;
    assert_eq!(declare_body_of(&app, "hook-first.wav").len(), 1);
    assert_eq!(app.jobs().await.len(), 3);
    app.stop().await;
}

/// Exit codes a recorder's hook can act on: 78 with who must do what when the folder is missing
/// or not writable, 2 for usage errors.
#[test]
fn the_hook_exit_codes_say_who_must_act() {
    let (_base, dir) = hook_folder();
    let rec = tempfile::tempdir().unwrap();
    std::fs::set_permissions(rec.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let f = rec.path().join("a.wav");
    std::fs::write(&f, wav(0.1)).unwrap();
    let f = f.to_str().unwrap();

    let missing = hook(&dir.join("none"), &[f], false);
    assert_eq!(missing.status.code(), Some(78));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("does not exist") && err.contains("install -d"),
        "{err}"
    );

    if is_root() {
        // Not in the folder's group: the admin must add the recorder's user to it.
        let o = Command::new(callferry_for_others(dir.parent().unwrap()))
            .args(["enqueue", "--now", "--hook-dir"])
            .arg(&dir)
            .arg(f)
            .uid(UID)
            .gid(GID + 1)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(78));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("cannot write") && err.contains("usermod -aG"),
            "{err}"
        );
    }
    for (args, why) in [
        (vec!["--meta", "no-equals", f], "KEY=VALUE"),
        (vec!["--meta", "bad key=1", f], "letters, digits"),
        (vec!["--meta", "k=1", "--meta", "k=2", f], "twice"),
        (vec!["--urlencoded", "--meta", "k=%zz", f], "hex digits"),
        (vec![f, f], "exactly one FILE"),
        (vec!["/nonexistent/x.wav"], "does not exist"),
    ] {
        let o = hook(&dir, &args, false);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(why), "{args:?}: {err}");
    }
    // --meta without --now is clap's usage error.
    let o = Command::new(env!("CARGO_BIN_EXE_callferry"))
        .args(["enqueue", "--meta", "k=v", f])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(requests_left(&dir).is_empty());
}

/// A watched folder that is a link: the recorder names the recording by the folder's real
/// location, the watcher by the link. One job, named as the watcher names it, one declare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_through_the_watched_folders_real_location_is_the_same_job() {
    let (base, dir) = hook_folder();
    let real = base.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = base.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let mut app = TestApp::start(&config(
        &dir,
        &format!("paths = [\"{}\"]\nsettle = \"10m\"\n", link.display()),
    ))
    .await;
    std::fs::write(real.join("real.wav"), wav(0.3)).unwrap();
    ok(&hook(
        &dir,
        &[
            "--external-id",
            "via-real",
            real.join("real.wav").to_str().unwrap(),
        ],
        false,
    ));
    let job = app.wait_state(&link.join("real.wav"), "uploaded").await;
    assert_eq!(job.external_id.as_deref(), Some("via-real"));
    assert_eq!(app.jobs().await.len(), 1);
    assert_eq!(declare_body_of(&app, "real.wav").len(), 1);
    app.stop().await;
}
