//! Graceful stop: SIGTERM stops claiming, lets in-flight uploads finish within
//! `upload.shutdown_grace`, leaves the rest waiting, tells systemd STOPPING=1, and exits 0.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

use callferry::queue::{Queue, State};
use callferry_fake::{FakeApi, FakeOptions};

use super::proc::{Daemon, queue_when_ready, write_config};
use crate::helpers::*;

async fn fake() -> FakeApi {
    FakeApi::start(FakeOptions {
        token: TOKEN.into(),
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn queue(dir: &Path) -> Queue {
    queue_when_ready(&dir.join("state/queue.db")).await
}

/// Everything systemd's notify socket received so far.
fn notifications(sock: &UnixDatagram) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_uploads_finish_claims_nothing_more_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let fake = fake().await;
    // ~1.6 s per upload: SIGTERM lands while both workers are mid-transfer.
    fake.set_upload_rate(Some(100_000));
    let cfg = write_config(
        dir.path(),
        &fake.base_url(),
        "[upload]\nworkers = 2\nshutdown_grace = \"20s\"\n",
    );
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_nonblocking(true).unwrap();
    let mut d = Daemon::spawn(
        &cfg,
        &dir.path().join("daemon.log"),
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    d.wait_log("callferry running").await;

    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            let b = callferry_fake::wav_bytes(10.0, 300.0 + i as f64);
            let name = format!("t{i}.wav");
            std::fs::write(rec.join(&name), &b).unwrap();
            (name, b)
        })
        .collect();
    let q = queue(dir.path()).await;
    eventually("two uploads in flight, two jobs waiting", || async {
        let c = q.counts().await.unwrap();
        c.uploading == 2 && c.pending == 2
    })
    .await;
    d.signal(libc::SIGTERM);
    let st = d.wait(DEADLINE).await;
    assert_eq!(st.code(), Some(0), "{}", d.log_text());

    let jobs = q.list(None, 10).await.unwrap();
    let uploaded: Vec<_> = jobs.iter().filter(|j| j.state == State::Uploaded).collect();
    let waiting: Vec<_> = jobs.iter().filter(|j| j.state == State::Pending).collect();
    assert_eq!(
        uploaded.len(),
        2,
        "the in-flight uploads finished: {jobs:#?}"
    );
    assert_eq!(
        waiting.len(),
        2,
        "the rest wait for the next start: {jobs:#?}"
    );
    for j in &waiting {
        assert_eq!(j.attempts, 0);
        assert!(j.interaction_id.is_none(), "not declared after SIGTERM");
    }
    assert_eq!(fake.counters().declares, 2, "nothing claimed after SIGTERM");
    for j in &uploaded {
        let name = Path::new(&j.path).file_name().unwrap().to_str().unwrap();
        let bytes = &files.iter().find(|(n, _)| n == name).unwrap().1;
        let rec = fake
            .interactions()
            .into_iter()
            .find(|i| Some(i.id.as_str()) == j.interaction_id.as_deref())
            .unwrap();
        assert!(
            rec.uploads
                .iter()
                .any(|u| u.stored && u.sha256 == sha256(bytes))
        );
    }
    let log = d.log_text();
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(
        log.contains("stopping: no new uploads"),
        "the log says what happens: {log}"
    );
    let notes = notifications(&sock);
    let ready = notes.iter().position(|n| n.contains("READY=1"));
    let stopping = notes.iter().position(|n| n.contains("STOPPING=1"));
    assert!(
        ready.is_some() && stopping > ready,
        "systemd sees READY then STOPPING: {notes:?}"
    );
    q.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grace_shorter_than_the_upload_puts_it_back_and_the_next_start_finishes_it() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let fake = fake().await;
    fake.set_upload_rate(Some(20_000)); // 160 KB: 8 s, far longer than the grace
    let cfg = write_config(
        dir.path(),
        &fake.base_url(),
        "[upload]\nworkers = 1\nshutdown_grace = \"300ms\"\n",
    );
    let log = dir.path().join("daemon.log");
    let mut d = Daemon::spawn(&cfg, &log, &[]);
    d.wait_log("callferry running").await;
    let bytes = callferry_fake::wav_bytes(10.0, 440.0);
    std::fs::write(rec.join("long.wav"), &bytes).unwrap();
    let q = queue(dir.path()).await;
    eventually("the upload in flight", || async {
        q.counts().await.unwrap().uploading == 1
    })
    .await;
    d.signal(libc::SIGTERM);
    let st = tokio::time::timeout(Duration::from_secs(10), d.wait(DEADLINE))
        .await
        .expect("exits soon after the grace");
    assert_eq!(st.code(), Some(0), "{}", d.log_text());
    assert!(
        d.log_text().contains("shutdown grace over"),
        "{}",
        d.log_text()
    );
    let job = q.list(None, 10).await.unwrap().remove(0);
    assert_eq!(
        job.state,
        State::Declared,
        "put back, keeping its id: {job:?}"
    );
    assert_eq!(
        job.attempts, 0,
        "an interrupted upload is not the job's fault"
    );
    let iid = job.interaction_id.clone().unwrap();

    // The next start uploads it on the same interaction.
    fake.set_upload_rate(None);
    let mut d = Daemon::spawn(&cfg, &log, &[]);
    let job = poll_for("uploaded after restart", || async {
        q.get(job.id)
            .await
            .unwrap()
            .filter(|j| j.state == State::Uploaded)
    })
    .await;
    assert_eq!(job.interaction_id.as_deref(), Some(iid.as_str()));
    assert_eq!(fake.counters().declares, 1);
    let rec = fake
        .interactions()
        .into_iter()
        .find(|i| i.id == iid)
        .unwrap();
    let stored: Vec<_> = rec.uploads.iter().filter(|u| u.stored).collect();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].sha256, sha256(&bytes));
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(DEADLINE).await.code(), Some(0));
    q.close().await;
}
