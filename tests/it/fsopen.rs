//! Issue 12 items 4 and 8: a hostile file system under the watched folders. A pending recording
//! swapped for a FIFO, a folder or a symbolic link, and a symlinked folder inside the tree, must
//! neither stall the daemon nor bring anything from outside the tree to the API.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use crate::helpers::*;

/// A WAV whose header still has ffmpeg's placeholder size: never complete while it stays so, so
/// the watcher keeps it as a candidate and looks at it again and again.
fn unfinished_wav() -> Vec<u8> {
    let mut b = wav(0.5);
    b[4..8].copy_from_slice(&0xFFFF_FFFFu32.to_le_bytes());
    b
}

fn mkfifo(p: &Path) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid path string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// Replaces `path` atomically by what `make` creates at a temporary name beside it.
fn swap(path: &Path, make: impl FnOnce(&Path)) {
    let tmp = path.with_file_name(".swap.tmp");
    make(&tmp);
    std::fs::rename(&tmp, path).unwrap();
}

/// Replaces `path` by a folder in one step (rename() cannot put a folder over a file, and a
/// remove-then-create lets the watcher forget the file in between): RENAME_EXCHANGE, then the old
/// file, now at the (ignored) temporary name, is removed.
fn exchange(path: &Path, make: impl FnOnce(&Path)) {
    let tmp = path.with_file_name(".swap.tmp");
    make(&tmp);
    let (a, b) = (
        CString::new(tmp.as_os_str().as_bytes()).unwrap(),
        CString::new(path.as_os_str().as_bytes()).unwrap(),
    );
    // SAFETY: valid path strings.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(rc, 0, "renameat2: {}", std::io::Error::last_os_error());
    std::fs::remove_file(&tmp).unwrap();
}

/// Candidates the watcher already has when this returns: files there before the daemon started,
/// seen by the startup scan (which runs right after READY).
async fn start_with_candidates(names: &[&str]) -> TestApp {
    let mut app = TestApp::start("").await;
    app.stop().await;
    for n in names {
        std::fs::write(app.rec.join(n), unfinished_wav()).unwrap();
    }
    app.restart().await;
    eventually("the startup scan", || async {
        app.handle.metrics.watch.scans_done() >= 1
    })
    .await;
    app
}

fn stored_sha256s(app: &TestApp) -> Vec<String> {
    app.fake
        .interactions()
        .into_iter()
        .flat_map(|i| i.uploads)
        .filter(|u| u.stored)
        .map(|u| u.sha256)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_file_swapped_for_a_fifo_or_a_folder_is_refused_and_the_watcher_goes_on() {
    let mut app = start_with_candidates(&["fifo.wav", "dir.wav"]).await;
    let before = app.handle.metrics.watch.files_not_queued();
    // Before the fix the watcher blocked for good in open() of the FIFO, and the folder stayed a
    // candidate forever ("cannot read it: Is a directory; will try again").
    swap(&app.rec.join("fifo.wav"), mkfifo);
    exchange(&app.rec.join("dir.wav"), |t| {
        std::fs::create_dir(t).unwrap()
    });
    eventually("both to be refused", || async {
        app.handle.metrics.watch.files_not_queued() >= before + 2
    })
    .await;
    let b = wav(1.0);
    let pb = app.drop_file("after.wav", &b);
    let job = app.wait_state(&pb, "uploaded").await;
    app.assert_uploaded_once(&job, &b);
    for n in ["fifo.wav", "dir.wav"] {
        assert!(app.job_for(&app.rec.join(n)).await.is_none(), "{n} queued");
    }
    // A watcher blocked in open() would also hold up the graceful stop.
    tokio::time::timeout(DEADLINE, app.stop())
        .await
        .expect("the daemon stops");
}

fn private_recording(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let secret = dir.join("secret.wav");
    let bytes = wav(2.25);
    std::fs::write(&secret, &bytes).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    (secret, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_file_swapped_for_a_link_to_a_private_file_outside_is_never_uploaded() {
    let outside = tempfile::tempdir().unwrap();
    let (secret, secret_bytes) = private_recording(outside.path());

    // While the watcher waits on it.
    let mut app = start_with_candidates(&["call.wav"]).await;
    let before = app.handle.metrics.watch.files_not_queued();
    let p = app.rec.join("call.wav");
    swap(&p, |t| symlink(&secret, t).unwrap());
    eventually("the link to be refused", || async {
        app.handle.metrics.watch.files_not_queued() > before
    })
    .await;
    assert!(app.job_for(&p).await.is_none(), "the link was queued");

    // After it was queued, before its upload: the worker opens the path itself.
    app.fake.go_down().await;
    let q = app.drop_file("queued.wav", &wav(1.0));
    let job = poll_for("the job to be queued", || async { app.job_for(&q).await }).await;
    assert!(job.ino != 0);
    swap(&q, |t| symlink(&secret, t).unwrap());
    app.fake.come_up().await.unwrap();
    // Refused: the job waits for its recording to turn up (it may have been moved), never
    // declared on the link's target.
    eventually("the worker to refuse the link", || async {
        app.job_for(&q).await.is_some_and(|j| {
            j.last_error
                .as_deref()
                .is_some_and(|e| e.contains("not at"))
        })
    })
    .await;

    // The watcher and the workers still work.
    let b = wav(1.0);
    let pb = app.drop_file("after.wav", &b);
    let job = app.wait_state(&pb, "uploaded").await;
    app.assert_uploaded_once(&job, &b);
    assert!(
        !stored_sha256s(&app).contains(&sha256(&secret_bytes)),
        "the private file outside the tree reached the API"
    );
    assert_eq!(
        app.fake.counters().declares,
        1,
        "only after.wav was declared"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlinked_folder_inside_the_tree_is_not_followed() {
    let outside = tempfile::tempdir().unwrap();
    let mut app = TestApp::start("").await;
    app.stop().await;
    // One link there at start (the startup scan and the recursive watch), one made later (a
    // new-folder event).
    symlink(outside.path(), app.rec.join("linked")).unwrap();
    std::fs::write(outside.path().join("early.wav"), wav(1.25)).unwrap();
    app.restart().await;
    symlink(outside.path(), app.rec.join("linked-later")).unwrap();
    let late = wav(1.75);
    std::fs::write(outside.path().join("late.wav"), &late).unwrap();
    // Written after the link files, and settled the same way: by the time it is uploaded, a file
    // seen through a link would have been queued too.
    let b = wav(1.0);
    let pb = app.drop_file("sub/after.wav", &b);
    let job = app.wait_state(&pb, "uploaded").await;
    app.assert_uploaded_once(&job, &b);
    let jobs = app.jobs().await;
    assert_eq!(jobs.len(), 1, "only sub/after.wav was queued: {jobs:?}");
    let stored = stored_sha256s(&app);
    assert!(!stored.contains(&sha256(&late)));
    assert!(!stored.contains(&sha256(&wav(1.25))));
    app.stop().await;
}

/// Issue 12 item 3: a name that is not UTF-8 (a Latin-1 caller name). Stored lossily, the path no
/// longer named the file: the job "vanished" and the file was queued again at every rescan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latin1_named_recording_is_uploaded_once_and_not_queued_again_by_rescans() {
    use std::os::unix::ffi::OsStrExt;
    let mut app = TestApp::start("[watch]\nrescan_interval = \"1s\"\n").await;
    let name = std::ffi::OsStr::from_bytes(b"Jos\xe9 Mu\xf1oz 2026-12-01.wav");
    let dir = std::ffi::OsStr::from_bytes(b"caf\xe9");
    std::fs::create_dir(app.rec.join(dir)).unwrap();
    let p = app.rec.join(dir).join(name);
    let tmp = app.rec.join(dir).join(".incoming.part");
    let bytes = wav(1.0);
    std::fs::write(&tmp, &bytes).unwrap();
    std::fs::rename(&tmp, &p).unwrap();

    let find = || async { app.jobs().await.into_iter().find(|j| j.fs_path() == p) };
    let job = poll_for("the Latin-1 recording to be uploaded", || async {
        find()
            .await
            .filter(|j| j.state.public().as_str() == "uploaded")
    })
    .await;
    assert_eq!(job.display_path(), p.to_string_lossy());
    let rescans = app.handle.metrics.watcher_rescans();
    eventually("three more rescans", || async {
        app.handle.metrics.watcher_rescans() >= rescans + 3
    })
    .await;
    let jobs = app.jobs().await;
    assert_eq!(jobs.len(), 1, "queued once: {jobs:?}");
    assert_eq!(app.fake.counters().declares, 1);
    let stored = stored_sha256s(&app);
    assert_eq!(stored, vec![sha256(&bytes)]);
    // Listed for people as the lossy name.
    let listed = serde_json::to_value(&jobs[0]).unwrap();
    assert_eq!(listed["path"], p.to_string_lossy().as_ref());
    app.stop().await;
}
