//! A full disk under the queue database: uploads pause (gate `Pause::Storage`), every job is kept,
//! no interaction id is forgotten, no file is moved before its upload is recorded, and work
//! resumes by itself when space is back.

use std::path::PathBuf;

use callferry::gate::Pause;

use crate::helpers::*;

const N: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pauses_keeps_every_job_and_resumes_when_space_is_back() {
    let done = tempfile::tempdir().unwrap();
    let mut app = TestApp::start(&format!(
        "[after_upload]\naction = \"move\"\nmove_to = \"{}\"\n",
        done.path().display()
    ))
    .await;
    // Hold the jobs in the queue while the disk "fills".
    app.fake.go_down().await;
    // Enough jobs that recording their outcomes needs new database pages.
    let files: Vec<(PathBuf, Vec<u8>)> = (0..N)
        .map(|i| {
            let b = callferry_fake::wav_bytes(0.05, 300.0 + i as f64);
            (app.drop_file(&format!("full-{i:02}.wav"), &b), b)
        })
        .collect();
    eventually("all queued", || async {
        app.handle.queue.counts().await.unwrap().total() == N as u64
    })
    .await;
    app.handle.queue.simulate_disk_full(true).await.unwrap();
    app.fake.come_up().await.unwrap();

    let reason = poll_for("uploads to pause on the full disk", || async {
        match app.handle.gate.state().pause {
            Some(p @ Pause::Storage(_)) => Some(p.reason()),
            _ => None,
        }
    })
    .await;
    assert!(
        reason.contains("queue database not writable") && reason.contains("full"),
        "{reason}"
    );
    let c = app.handle.queue.counts().await.unwrap();
    assert_eq!(c.total(), N as u64, "every job kept: {c:?}");
    assert_eq!(c.failed, 0, "{c:?}");
    // A file is moved only once its upload is committed: whatever has left the folder is
    // `uploaded` in the queue (looked at in that order, so a move in between cannot fool us).
    for _ in 0..20 {
        let moved: Vec<String> = files
            .iter()
            .filter(|(p, _)| !p.exists())
            .map(|(p, _)| p.to_string_lossy().into_owned())
            .collect();
        let jobs = app.jobs().await;
        for m in &moved {
            let j = jobs.iter().find(|j| &j.path == m).unwrap();
            assert_eq!(
                j.state,
                callferry::queue::State::Uploaded,
                "{m} moved early"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }

    // Space is back: everything drains, each file stored once, and no file declared twice (an
    // interaction id the full disk kept us from recording must not be forgotten).
    app.handle.queue.simulate_disk_full(false).await.unwrap();
    for (p, b) in &files {
        let job = app.wait_state(p, "uploaded").await;
        app.assert_uploaded_once(&job, b);
    }
    assert_eq!(app.fake.counters().declares, N as u64, "no second declare");
    for (p, b) in &files {
        let dest = done.path().join(p.file_name().unwrap());
        eventually("moved", || async { dest.exists() && !p.exists() }).await;
        assert_eq!(&std::fs::read(&dest).unwrap(), b);
    }
    eventually("the pause to be lifted", || async {
        app.handle.gate.state().pause.is_none()
    })
    .await;
    app.stop().await;
}
