//! A watched folder that goes and comes back is noticed through inotify (its own watch, a watch on
//! its nearest existing parent), not by polling the roots. Rescans are off here and the
//! fallback look for missing folders is 10 minutes away, so only the events can find them in time.

use std::path::Path;

use crate::helpers::*;

const NO_RESCANS: &str = "[watch]\nrescan_interval = \"0s\"\n";

async fn uploaded(app: &TestApp, n: u64) {
    eventually(&format!("{n} uploaded"), || async {
        app.handle.queue.counts().await.unwrap().uploaded == n
    })
    .await;
}

fn stored_once(app: &TestApp, name: &str, bytes: &[u8]) {
    let stored: Vec<_> = app
        .fake
        .interactions()
        .into_iter()
        .flat_map(|i| i.uploads)
        .filter(|u| u.stored && u.field_name == name)
        .collect();
    assert_eq!(stored.len(), 1, "{name}");
    assert_eq!(stored[0].sha256, sha256(bytes), "{name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_deleted_or_moved_away_and_made_again_is_watched_again_without_a_poll() {
    let mut app = TestApp::start(NO_RESCANS).await;
    let a = wav(0.3);
    app.drop_file("a.wav", &a);
    uploaded(&app, 1).await;

    // Deleted and made again at once: the old watch died with the old folder.
    std::fs::remove_dir_all(&app.rec).unwrap();
    std::fs::create_dir(&app.rec).unwrap();
    let b = wav(0.4);
    app.drop_file("b.wav", &b);
    uploaded(&app, 2).await;

    // Moved away (its watch would follow it), then a new folder under the name, filled later.
    let old = app.dir.path().join("rec.old");
    std::fs::rename(&app.rec, &old).unwrap();
    std::fs::write(old.join("stray.wav"), wav(0.2)).unwrap();
    std::fs::create_dir(&app.rec).unwrap();
    let c = wav(0.5);
    app.drop_file("sub/c.wav", &c);
    uploaded(&app, 3).await;

    for (name, bytes) in [("a.wav", &a), ("b.wav", &b), ("c.wav", &c)] {
        stored_once(&app, name, bytes);
    }
    assert!(
        app.job_for(&old.join("stray.wav")).await.is_none(),
        "a folder moved out of the configured path is no longer watched"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_whose_parents_are_missing_too_is_found_when_they_are_made() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("mnt/day/rec");
    let extra = format!("{NO_RESCANS}paths = [\"{}\"]\n", deep.display());
    let mut app = TestApp::start(&extra).await;
    std::fs::create_dir_all(deep.parent().unwrap()).unwrap();
    // One level at a time, as a mount helper or an operator would.
    std::fs::create_dir(&deep).unwrap();
    let a = wav(0.3);
    let tmp = deep.join(".a.wav.part");
    std::fs::write(&tmp, &a).unwrap();
    std::fs::rename(&tmp, deep.join("a.wav")).unwrap();
    uploaded(&app, 1).await;
    stored_once(&app, "a.wav", &a);
    assert!(Path::new(&app.jobs().await[0].path).starts_with(&deep));
    app.stop().await;
}
