//! `callferry forget`: a call erased at ElevateAI (the fake's own records), in the results and the
//! index, and in every byte of the database's files, while the daemon runs; across a `kill -9` at
//! each step; and the recording, still on disk, is never uploaded again.

use std::path::{Path, PathBuf};
use std::process::Command;

use callferry::queue::Job;
use callferry_fake::{Endpoint, Fault};

use crate::helpers::*;

fn callferry(cfg: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_callferry"));
    c.env_remove("CALLFERRY_CONFIG")
        .env_remove("RUST_LOG")
        .env_remove("CALLFERRY_FAULT_FORGET")
        .arg("--config")
        .arg(cfg);
    c
}

fn results_toml(out: &Path) -> String {
    format!(
        "[results]\nenabled = true\noutput_dir = \"{}\"\npoll_interval = \"200ms\"\n",
        out.display()
    )
}

/// The app's config as a file, for the binary.
fn config_file(app: &TestApp) -> PathBuf {
    let p = app.dir.path().join("callferry.toml");
    std::fs::write(
        &p,
        config_text(&app.fake.base_url(), app.dir.path(), &app.extra_toml),
    )
    .unwrap();
    p
}

fn run(cmd: &mut Command) -> (Option<i32>, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Which of `needles` occur anywhere in the database's files (the database, its `-wal` and
/// `-shm`), byte for byte: free pages and old log frames included.
fn traces(db: &Path, needles: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let f = PathBuf::from(format!("{}{suffix}", db.display()));
        // Read by another process: closing a descriptor of the database in this one would drop
        // the in-process daemon's POSIX locks on it (SQLite's locks are per process).
        let read = Command::new("cat").arg(&f).output().unwrap();
        if !read.status.success() {
            continue;
        }
        let bytes = read.stdout;
        for n in needles {
            if bytes.windows(n.len()).any(|w| w == n.as_bytes()) {
                found.push(format!("{n} in {}", f.display()));
            }
        }
    }
    found
}

fn index_ids(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("index.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["interaction_id"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Result files written for a job (by name: the recording's name is in each).
fn results_of(out: &Path, name: &str) -> Vec<PathBuf> {
    walkdir::WalkDir::new(out)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(name))
        .map(|e| e.path().to_path_buf())
        .collect()
}

fn iid(job: &Job) -> String {
    job.interaction_id.clone().expect("an interaction id")
}

/// Asserts the call `job` (recorded as `name`) is gone everywhere: at the fake, in the results and
/// the index, and in the database's bytes.
fn assert_erased(app: &TestApp, out: &Path, job: &Job, name: &str) {
    let id = iid(job);
    assert!(
        app.fake.deleted().contains(&id),
        "the fake recorded the delete of {id}: {:?}",
        app.fake.deleted()
    );
    assert!(app.fake.interactions().iter().all(|i| i.id != id));
    assert_eq!(
        results_of(out, name),
        Vec::<PathBuf>::new(),
        "results removed"
    );
    assert!(!index_ids(out).contains(&id), "index line removed");
    let ext = job.external_id.clone().unwrap_or_default();
    let mut needles = vec![name, id.as_str()];
    if !ext.is_empty() {
        needles.push(ext.as_str());
    }
    assert_eq!(traces(&app.db_path(), &needles), Vec::<String>::new());
}

const A: &str = "out-5551234-1001-20261201-101500-1764584100.42.wav";
const B: &str = "in-1001-5559876-20261201-111500-1764587700.7.wav";

/// Forget by job id while the daemon runs: the interaction is deleted at the fake, the results
/// and index line go, the database's files hold no byte of the path, call id or interaction id,
/// the other call is untouched, and the recording, still on disk, is not uploaded again after a
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_by_id_erases_the_call_everywhere_and_it_is_not_uploaded_again() {
    let out = tempfile::tempdir().unwrap();
    let mut app = TestApp::start(&results_toml(out.path())).await;
    let pa = app.drop_file(&format!("2026/12/01/{A}"), &wav(0.3));
    let pb = app.drop_file(&format!("2026/12/01/{B}"), &wav(0.4));
    let ja = app.wait_state(&pa, "processed").await;
    let jb = app.wait_state(&pb, "processed").await;
    assert_eq!(ja.external_id.as_deref(), Some("1764584100.42"));
    assert!(!results_of(out.path(), A).is_empty());
    // The scan below finds what is there: before, every needle is in the database.
    assert!(!traces(&app.db_path(), &[A, &iid(&ja)]).is_empty());
    let cfg = config_file(&app);

    let (code, stdout, stderr) = run(callferry(&cfg).args(["forget", &ja.id.to_string()]));
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("forgot 1 call(s); 1 interaction(s) deleted"),
        "{stdout}"
    );
    assert_erased(&app, out.path(), &ja, A);
    assert!(app.job_for(&pa).await.is_none());
    assert!(pa.exists(), "the recording itself is not ours to delete");
    // The other call is untouched.
    assert_eq!(index_ids(out.path()), vec![iid(&jb)]);
    assert_eq!(results_of(out.path(), B).len(), 2);
    assert!(app.fake.interactions().iter().any(|i| i.id == iid(&jb)));
    assert_eq!(traces(&app.db_path(), &[B]).len(), 1, "B is still known");

    // Forgetting again: a clear message, not a crash.
    let (code, _, stderr) = run(callferry(&cfg).args(["forget", &ja.id.to_string()]));
    assert_eq!(code, Some(1));
    assert!(stderr.contains(&format!("no job {}", ja.id)), "{stderr}");

    // A restart scans the folder: the forgotten recording is still there and stays unsent. A
    // new recording found by the same scan shows the scan has run.
    app.stop().await;
    app.restart().await;
    // The vacuum left to the daemon's start (a forget beside a running daemon cannot vacuum).
    poll_for("the daemon's vacuum", || async {
        (!app.handle.queue.scrub_pending().await.unwrap()).then_some(())
    })
    .await;
    assert_eq!(
        traces(&app.db_path(), &[A, &iid(&ja)]),
        Vec::<String>::new()
    );
    let pc = app.drop_file("2026/12/02/later.wav", &wav(0.2));
    app.wait_state(&pc, "processed").await;
    assert!(app.job_for(&pa).await.is_none(), "not queued again");
    assert_eq!(
        app.fake.counters().declares,
        3,
        "a, b, c: a was not declared again"
    );
    app.stop().await;
}

/// Old recordings: written, then dated back `days`, then moved into the folder.
fn drop_old(app: &TestApp, rel: &str, days: u64) -> PathBuf {
    let dest = app.rec.join(rel);
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    let tmp = app.rec.join(format!(".{days}.part"));
    std::fs::write(&tmp, wav(0.2)).unwrap();
    let f = std::fs::File::options().write(true).open(&tmp).unwrap();
    f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(days * 86_400))
        .unwrap();
    drop(f);
    std::fs::rename(&tmp, &dest).unwrap();
    dest
}

/// By call id (FreePBX's uniqueid), and by age (the recording's time): only the calls named go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_by_external_id_and_by_age() {
    let out = tempfile::tempdir().unwrap();
    let mut app = TestApp::start(&results_toml(out.path())).await;
    let pa = app.drop_file(&format!("2026/12/01/{A}"), &wav(0.3));
    let pb = app.drop_file(&format!("2026/12/01/{B}"), &wav(0.4));
    let old1 = drop_old(&app, "old/one.wav", 100);
    let old2 = drop_old(&app, "old/two.wav", 40);
    let ja = app.wait_state(&pa, "processed").await;
    let jb = app.wait_state(&pb, "processed").await;
    let j1 = app.wait_state(&old1, "processed").await;
    let j2 = app.wait_state(&old2, "processed").await;
    let cfg = config_file(&app);

    let (code, stdout, stderr) =
        run(callferry(&cfg).args(["forget", "--external-id", "1764584100.42", "no-such-call"]));
    assert_eq!(code, Some(1), "one id matched nothing: {stdout}\n{stderr}");
    assert!(
        stderr.contains("no call with external id \"no-such-call\""),
        "{stderr}"
    );
    assert!(stdout.contains("forgot 1 call(s)"), "{stdout}");
    assert_erased(&app, out.path(), &ja, A);

    let (code, stdout, stderr) = run(callferry(&cfg).args(["forget", "--older-than", "30d"]));
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("forgot 2 call(s)"), "{stdout}");
    assert_erased(&app, out.path(), &j1, "one.wav");
    assert_erased(&app, out.path(), &j2, "two.wav");
    let left: Vec<i64> = app.jobs().await.iter().map(|j| j.id).collect();
    assert_eq!(left, vec![jb.id]);
    assert_eq!(index_ids(out.path()), vec![iid(&jb)]);
    app.stop().await;
}

/// A forget killed right after each of its steps (the debug build's fault hook aborts the
/// process, as `kill -9` would) is finished by the next `forget`; a remote delete refused (503,
/// then a rejected token) leaves the forget pending with exit 1 and what to do, and
/// `forget --pending` finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forget_killed_at_any_step_or_refused_is_finished_by_the_next() {
    let out = tempfile::tempdir().unwrap();
    let mut app = TestApp::start(&results_toml(out.path())).await;
    let names: Vec<String> = (1..=7).map(|k| format!("call-{k}.wav")).collect();
    let paths: Vec<PathBuf> = names.iter().map(|n| app.drop_file(n, &wav(0.2))).collect();
    let mut jobs = Vec::new();
    for p in &paths {
        jobs.push(app.wait_state(p, "processed").await);
    }
    let cfg = config_file(&app);
    for step in 1..=5u32 {
        let job = &jobs[step as usize - 1];
        let (code, stdout, stderr) = run(callferry(&cfg)
            .env("CALLFERRY_FAULT_FORGET", step.to_string())
            .args(["forget", &job.id.to_string()]));
        assert_eq!(code, None, "killed after step {step}: {stdout}\n{stderr}");
        let (code, stdout, stderr) = run(callferry(&cfg).args(["forget", "--pending"]));
        assert_eq!(code, Some(0), "after step {step}: {stdout}\n{stderr}");
        if step < 5 {
            assert!(
                stdout.contains("1 forget(s) complete"),
                "step {step}: {stdout}"
            );
        }
        assert_erased(&app, out.path(), job, &names[step as usize - 1]);
        assert!(
            app.job_for(&paths[step as usize - 1]).await.is_none(),
            "the daemon's own connection sees it gone too"
        );
    }

    // Refused: a 503, then a rejected token. Local traces go at once; the remote waits.
    let job = &jobs[5];
    app.fake.push_fault(Endpoint::Delete, Fault::Status(503));
    let (code, stdout, stderr) = run(callferry(&cfg).args(["forget", &job.id.to_string()]));
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("HTTP 503"), "{stderr}");
    assert!(stderr.contains("callferry forget --pending"), "{stderr}");
    assert!(app.fake.interactions().iter().any(|i| i.id == iid(job)));
    assert!(results_of(out.path(), &names[5]).is_empty());
    assert!(app.job_for(&paths[5]).await.is_none());
    app.fake.set_token("another-token");
    let (code, _, stderr) = run(callferry(&cfg).args(["forget", "--pending"]));
    assert_eq!(code, Some(1));
    assert!(stderr.contains("HTTP 401"), "{stderr}");
    assert!(!stderr.contains(TOKEN), "the token is never shown");
    // `status` says an erasure is owed, and why it is not done.
    let (code, status, _) = run(callferry(&cfg).args(["status", "--json"]));
    assert_eq!(code, Some(0));
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["pending_forgets"], 1, "{status}");
    assert!(
        status["forget_error"]
            .as_str()
            .is_some_and(|e| e.contains("401")),
        "{status}"
    );
    assert!(!status.to_string().contains(TOKEN));
    // The daemon finishes it at its next start.
    app.fake.set_token(TOKEN);
    app.stop().await;
    app.restart().await;
    poll_for("the pending forget finished by the daemon", || async {
        let q = &app.handle.queue;
        (q.pending_forgets().await.unwrap().is_empty() && !q.scrub_pending().await.unwrap())
            .then_some(())
    })
    .await;
    assert_erased(&app, out.path(), job, &names[5]);
    let (code, stdout, _) = run(callferry(&cfg).args(["forget", "--pending"]));
    assert_eq!(code, Some(0));
    assert!(stdout.contains("forgot 0 call(s)"), "{stdout}");

    // The untouched call is still fine and uploaded exactly once.
    app.assert_uploaded_once(&jobs[6], &wav(0.2));
    app.stop().await;
}

/// `[results] delete_remote_after_fetch`: each interaction is deleted at the fake once its results
/// are on disk and indexed; a delete answered 503 is retried; the results stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_remote_after_fetch_deletes_each_interaction_once_its_results_are_written() {
    let out = tempfile::tempdir().unwrap();
    let mut app = TestApp::start(&format!(
        "{}delete_remote_after_fetch = true\n",
        results_toml(out.path())
    ))
    .await;
    app.fake.push_fault(Endpoint::Delete, Fault::Status(503));
    let pa = app.drop_file(A, &wav(0.3));
    let pb = app.drop_file(B, &wav(0.3));
    let ja = app.wait_state(&pa, "processed").await;
    let jb = app.wait_state(&pb, "processed").await;
    for job in [&ja, &jb] {
        let id = iid(job);
        poll_for(&format!("{id} deleted at the fake"), || async {
            app.fake.deleted().contains(&id).then_some(())
        })
        .await;
        let now = poll_for("the delete recorded", || async {
            app.job_for(&job.fs_path())
                .await
                .filter(|j| j.service_status.as_deref() == Some("deleted"))
        })
        .await;
        assert!(now.follow_at.is_none(), "not asked again");
        let events = app.handle.queue.events(job.id).await.unwrap();
        assert!(events.iter().any(|e| e.1 == "remote-deleted"), "{events:?}");
    }
    assert_eq!(
        app.fake.counters().deletes,
        3,
        "one 503, retried, and two deletes"
    );
    assert!(app.fake.interactions().is_empty());
    // The results stay, indexed.
    assert_eq!(results_of(out.path(), A).len(), 2);
    assert_eq!(results_of(out.path(), B).len(), 2);
    let mut ids = index_ids(out.path());
    ids.sort();
    let mut want = vec![iid(&ja), iid(&jb)];
    want.sort();
    assert_eq!(ids, want);
    app.stop().await;
}

/// A call forgotten while the daemon is declaring it (the forget waits for the interaction id) and
/// one forgotten mid-upload (its interaction goes; the upload then finds none): neither comes back,
/// and the fake keeps nothing of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_in_the_daemon_is_forgotten_and_not_resurrected() {
    let out = tempfile::tempdir().unwrap();
    let mut app = TestApp::start(&results_toml(out.path())).await;
    let cfg = config_file(&app);

    // Declaring: the declare is held 3 s at the fake.
    app.fake.push_fault(
        Endpoint::Declare,
        Fault::Stall(std::time::Duration::from_secs(3)),
    );
    let pa = app.drop_file("declaring.wav", &wav(0.3));
    let ja = app.wait_state(&pa, "pending").await;
    poll_for("the declare in flight", || async {
        app.fake.counters().declares.eq(&1).then_some(())
    })
    .await;
    let (code, stdout, stderr) = run(callferry(&cfg).args(["forget", &ja.id.to_string()]));
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("forgot 1 call(s)"), "{stdout}");
    assert_eq!(
        app.fake.deleted().len(),
        1,
        "its interaction, once known, was deleted"
    );

    // Uploading: 160 KB at 16 KiB/s.
    app.fake.set_upload_rate(Some(16 * 1024));
    let pb = app.drop_file("uploading.wav", &wav(10.0));
    let jb = app.wait_state(&pb, "uploading").await;
    let (code, stdout, stderr) = run(callferry(&cfg).args(["forget", &jb.id.to_string()]));
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(app.fake.deleted().contains(&iid(&jb)));
    // Refused as unknown once the interaction is gone (or, on a slow machine, stored just
    // before the delete, which removed it with its audio).
    poll_for("the upload's answer", || async {
        let c = app.fake.counters();
        (c.uploads_rejected + c.uploads_stored == 1).then_some(())
    })
    .await;
    app.fake.set_upload_rate(None);

    // Neither comes back: a later recording goes through, and the fake holds only it.
    let pc = app.drop_file("later.wav", &wav(0.3));
    let jc = app.wait_state(&pc, "processed").await;
    let left: Vec<i64> = app.jobs().await.iter().map(|j| j.id).collect();
    assert_eq!(left, vec![jc.id]);
    let held: Vec<String> = app
        .fake
        .interactions()
        .iter()
        .map(|i| i.id.clone())
        .collect();
    assert_eq!(held, vec![iid(&jc)]);
    assert_eq!(app.fake.counters().declares, 3);
    assert_eq!(
        traces(
            &app.db_path(),
            &["declaring.wav", "uploading.wav", &iid(&jb)]
        ),
        Vec::<String>::new()
    );
    app.stop().await;
}
