//! Recordings over time: a path reused by a second call, a recording
//! moved while its job waits, and years of history in the tree.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use callferry::queue::Job;
use callferry_fake::{Endpoint, FakeOptions, Fault};

use crate::helpers::*;

/// The jobs recorded for one path, oldest first.
async fn versions(app: &TestApp, path: &Path) -> Vec<Job> {
    let mut v: Vec<Job> = app
        .jobs()
        .await
        .into_iter()
        .filter(|j| Path::new(&j.path) == path)
        .collect();
    v.sort_by_key(|j| j.id);
    v
}

/// Waits until `n` versions of `path` are all in `state`.
async fn wait_versions(app: &TestApp, path: &Path, n: usize, state: &str) -> Vec<Job> {
    poll_for(
        &format!("{n} versions of {} {state}", path.display()),
        || async {
            let v = versions(app, path).await;
            (v.len() == n && v.iter().all(|j| j.state.public().as_str() == state)).then_some(v)
        },
    )
    .await
}

/// Writes a second call at a path whose first call is done: a new file (new inode), as a recorder
/// that reuses names per line does.
fn second_call(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_call_at_the_same_path_gets_its_own_results_and_never_replaces_the_first() {
    let out = tempfile::tempdir().unwrap();
    let mut app = TestApp::start_with(
        &format!(
            "[results]\nenabled = true\noutput_dir = \"{}\"\npoll_interval = \"200ms\"\nkinds = [\"transcript\"]\n",
            out.path().display()
        ),
        FakeOptions {
            token: TOKEN.into(),
            processing_time: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .await;
    let a = wav(1.0);
    let p = app.drop_file("line1/call.wav", &a);
    let first = wait_versions(&app, &p, 1, "processed").await.remove(0);
    let first_result = out.path().join("line1/call.wav.transcript.json");
    let ino = std::fs::metadata(&first_result).unwrap().ino();

    let b = wav(1.5);
    second_call(&p, &b);
    let v = wait_versions(&app, &p, 2, "processed").await;
    assert_eq!(v[0].id, first.id);
    let iid2 = v[1].interaction_id.clone().unwrap();
    assert_ne!(first.interaction_id.as_deref(), Some(iid2.as_str()));
    // The first call's results are where they always were, untouched (same inode: not rewritten).
    assert_eq!(std::fs::metadata(&first_result).unwrap().ino(), ino);
    // The second's carry its interaction id.
    let second_result = out
        .path()
        .join(format!("line1/call.wav.{iid2}.transcript.json"));
    assert!(second_result.exists(), "{}", second_result.display());
    let names: Vec<_> = std::fs::read_dir(out.path().join("line1"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    // Each stored once, on its own interaction (the fake's records).
    for (job, bytes) in [(&v[0], &a), (&v[1], &b)] {
        let rec = app.interaction(job.interaction_id.as_deref().unwrap());
        let stored: Vec<_> = rec.uploads.iter().filter(|u| u.stored).collect();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].sha256, sha256(bytes));
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_upload_move_never_replaces_an_earlier_call_with_the_same_name() {
    let done = tempfile::tempdir().unwrap();
    let mut app = TestApp::start(&format!(
        "[after_upload]\naction = \"move\"\nmove_to = \"{}\"\n",
        done.path().display()
    ))
    .await;
    let a = wav(1.0);
    let p = app.drop_file("line1/call.wav", &a);
    let dest = done.path().join("line1/call.wav");
    eventually("the first call to be moved", || async {
        dest.exists() && !p.exists()
    })
    .await;

    let b = wav(1.5);
    second_call(&p, &b);
    let v = wait_versions(&app, &p, 2, "uploaded").await;
    let iid2 = v[1].interaction_id.clone().unwrap();
    let dest2 = done.path().join(format!("line1/call.{iid2}.wav"));
    eventually("the second call to be moved beside the first", || async {
        dest2.exists() && !p.exists()
    })
    .await;
    assert_eq!(std::fs::read(&dest).unwrap(), a, "the first call is kept");
    assert_eq!(std::fs::read(&dest2).unwrap(), b);
    // Recorded after the move itself, so polled for.
    eventually("the move to be recorded under its own name", || async {
        app.handle
            .queue
            .events(v[1].id)
            .await
            .unwrap()
            .iter()
            .any(|(_, e, d)| e == "after-upload" && d.as_deref().unwrap_or("").contains(&iid2))
    })
    .await;
    app.stop().await;
}
/// Where a test moves a recording to, inside the watched tree.
fn move_within(app: &TestApp, from: &Path, rel: &str) -> PathBuf {
    let to = app.rec.join(rel);
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::rename(from, &to).unwrap();
    to
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_moved_before_its_declare_is_uploaded_from_where_it_is_now() {
    let mut app = TestApp::start("").await;
    // The API is down: the job waits, undeclared, while the recording is filed elsewhere.
    app.fake.go_down().await;
    let a = wav(1.0);
    let p = app.drop_file("incoming/call.wav", &a);
    let queued = poll_for("the job to be queued", || async { app.job_for(&p).await }).await;
    let moved = move_within(&app, &p, "2026/12/05/call.wav");
    // The watcher follows the file by its identity: the job now names the new path.
    let job = poll_for("the job to follow the file", || async {
        app.job_for(&moved).await
    })
    .await;
    assert_eq!(job.id, queued.id);
    app.fake.come_up().await.unwrap();
    let job = app.wait_state(&moved, "uploaded").await;
    assert_eq!(job.id, queued.id);
    app.assert_uploaded_once(&job, &a);
    let c = app.fake.counters();
    assert_eq!((c.declares, c.uploads_stored), (1, 1));
    let events = app.handle.queue.events(job.id).await.unwrap();
    assert!(events.iter().any(|(_, e, _)| e == "moved"), "{events:?}");
    assert_eq!(app.jobs().await.len(), 1, "no second job for the new path");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_moved_after_its_declare_is_uploaded_on_the_same_interaction() {
    let mut app = TestApp::start("").await;
    // Declared, then every upload attempt fails for a while: the job waits with its id.
    for _ in 0..4 {
        app.fake.push_fault(Endpoint::Upload, Fault::Status(503));
    }
    app.fake.set_latency(Duration::from_millis(200));
    let a = wav(1.0);
    let p = app.drop_file("incoming/call.wav", &a);
    let declared = poll_for("the job to be declared", || async {
        app.job_for(&p).await.filter(|j| j.interaction_id.is_some())
    })
    .await;
    let moved = move_within(&app, &p, "filed/call-1001.wav");
    app.fake.set_latency(Duration::ZERO);
    let job = app.wait_state(&moved, "uploaded").await;
    assert_eq!(job.id, declared.id);
    assert_eq!(
        job.interaction_id, declared.interaction_id,
        "same interaction"
    );
    app.assert_uploaded_once(&job, &a);
    let c = app.fake.counters();
    assert_eq!(
        (c.declares, c.uploads_stored),
        (1, 1),
        "declared once, stored once"
    );
    assert_eq!(app.fake.interactions().len(), 1);
    assert_eq!(app.jobs().await.len(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_replaced_by_another_call_at_its_path_is_followed_to_where_it_went() {
    // A recorder files the finished call away and starts the next one under the same name.
    let mut app = TestApp::start("").await;
    app.fake.go_down().await;
    let a = wav(1.0);
    let p = app.drop_file("line1.wav", &a);
    let queued = poll_for("the job to be queued", || async { app.job_for(&p).await }).await;
    let filed = move_within(&app, &p, "done/call-a.wav");
    let b = wav(1.4);
    second_call(&p, &b);
    let job = poll_for("the job to follow the first call", || async {
        app.job_for(&filed).await
    })
    .await;
    assert_eq!(job.id, queued.id);
    app.fake.come_up().await.unwrap();
    let first = app.wait_state(&filed, "uploaded").await;
    app.assert_uploaded_once(&first, &a);
    let second = app.wait_state(&p, "uploaded").await;
    app.assert_uploaded_once(&second, &b);
    assert_eq!(app.fake.counters().declares, 2);
    app.stop().await;
}

/// Opens of `name` in `dir` seen by inotify, counted from now on.
fn count_opens(
    dir: &Path,
    name: &'static str,
) -> (
    notify::RecommendedWatcher,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use notify::Watcher;
    let n = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let n2 = n.clone();
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev
            && matches!(
                ev.kind,
                notify::EventKind::Access(notify::event::AccessKind::Open(_))
            )
            && ev
                .paths
                .iter()
                .any(|p| p.file_name() == Some(name.as_ref()))
        {
            n2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    })
    .unwrap();
    w.watch(dir, notify::RecursiveMode::NonRecursive).unwrap();
    (w, n)
}

async fn wait_rescans(app: &TestApp, more: u64) {
    let from = app.handle.metrics.watcher_rescans();
    eventually(&format!("{more} more rescans"), || async {
        app.handle.metrics.watcher_rescans() >= from + more
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescan_costs_a_known_unchanged_recording_one_stat_and_never_an_open() {
    let mut app = TestApp::start("[watch]\nrescan_interval = \"1s\"\n").await;
    let a = wav(1.0);
    let p = app.drop_file("known.wav", &a);
    app.wait_state(&p, "uploaded").await;
    let (_w, opens) = count_opens(&app.rec, "known.wav");
    // Periodic rescans see it again and again: before, each one re-opened it (header, lease
    // probe) and asked the queue about it.
    wait_rescans(&app, 3).await;
    // A marker dropped now and uploaded proves the watcher was working all along.
    let m = app.drop_file("marker.wav", &wav(0.5));
    app.wait_state(&m, "uploaded").await;
    assert_eq!(opens.load(std::sync::atomic::Ordering::Relaxed), 0);
    // After a restart too: the known versions are loaded from the queue, not found by opening.
    app.stop().await;
    app.restart().await;
    wait_rescans(&app, 2).await;
    assert_eq!(opens.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(app.fake.counters().declares, 2);
    app.stop().await;
}
