use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;

use super::*;

async fn fresh() -> (tempfile::TempDir, Queue) {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(&dir.path().join("state/queue.db"), OpenMode::Create)
        .await
        .unwrap();
    (dir, q)
}

fn nj(path: &str, size: u64, mtime_ns: i64) -> NewJob {
    // A distinct inode per path, as distinct files have.
    let ino = path
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    NewJob {
        path: PathBuf::from(path),
        root: PathBuf::from("/rec"),
        size,
        mtime_ns,
        dev: 1,
        ino,
    }
}

#[tokio::test]
async fn a_hard_link_or_move_of_a_queued_file_is_the_same_recording() {
    let (_d, q) = fresh().await;
    let a = nj("/rec/a.wav", 10, 1);
    q.enqueue(std::slice::from_ref(&a), 100).await.unwrap();
    let mut link = a.clone();
    link.path = PathBuf::from("/rec2/a.wav");
    let r = q.enqueue(&[link], 101).await.unwrap();
    assert!(
        matches!(&r[0], Enqueued::SameFile { path, .. } if path == "/rec/a.wav"),
        "{r:?}"
    );
    // Same inode but appended to (new size): a new version.
    let mut grown = a.clone();
    grown.size = 20;
    grown.mtime_ns = 2;
    assert!(matches!(
        q.enqueue(&[grown], 102).await.unwrap()[0],
        Enqueued::New { .. }
    ));
}

#[tokio::test]
async fn one_batch_sorts_new_known_moved_linked_and_changed_files_apart() {
    let (_d, q) = fresh().await;
    let old = nj("/rec/old.wav", 10, 1);
    let moved = nj("/rec/moved.wav", 10, 1);
    let grows = nj("/rec/grows.wav", 10, 1);
    let r = q
        .enqueue(&[old.clone(), moved.clone(), grows.clone()], 100)
        .await
        .unwrap();
    let ids: Vec<i64> = r
        .iter()
        .map(|e| match e {
            Enqueued::New {
                id,
                supersedes: None,
            } => *id,
            other => panic!("{other:?}"),
        })
        .collect();
    let mut moved_now = moved.clone();
    moved_now.path = PathBuf::from("/rec/sub/moved.wav");
    let mut grown = grows.clone();
    grown.size = 20;
    grown.mtime_ns = 2;
    let fresh1 = nj("/rec/new.wav", 10, 1);
    let mut link = fresh1.clone();
    link.path = PathBuf::from("/rec/link-to-new.wav");
    let r = q
        .enqueue(&[old, moved_now, grown, fresh1, link], 101)
        .await
        .unwrap();
    assert_eq!(r[0], Enqueued::Known);
    assert_eq!(
        r[1],
        Enqueued::SameFile {
            existing: ids[1],
            path: "/rec/moved.wav".into()
        }
    );
    assert!(
        matches!(r[2], Enqueued::New { supersedes: Some(s), .. } if s == ids[2]),
        "{:?}",
        r[2]
    );
    let Enqueued::New {
        id: new_id,
        supersedes: None,
    } = r[3]
    else {
        panic!("{:?}", r[3]);
    };
    assert_eq!(
        r[4],
        Enqueued::SameFile {
            existing: new_id,
            path: "/rec/new.wav".into()
        }
    );
    assert_eq!(q.counts().await.unwrap().pending, 5);
    let ev = q.events(new_id).await.unwrap();
    assert_eq!(ev, [(101, "queued".to_string(), None)]);
}

#[tokio::test]
async fn database_is_private() {
    let (dir, _q) = fresh().await;
    let db = dir.path().join("state/queue.db");
    let mode = std::fs::metadata(&db).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dmode = std::fs::metadata(dir.path().join("state"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dmode, 0o700);
}

#[tokio::test]
async fn a_version_is_queued_once_and_a_new_version_supersedes() {
    let (_d, q) = fresh().await;
    let r = q
        .enqueue(&[nj("/rec/a.wav", 10, 1), nj("/rec/a.wav", 10, 1)], 100)
        .await
        .unwrap();
    assert!(matches!(
        r[0],
        Enqueued::New {
            supersedes: None,
            ..
        }
    ));
    assert_eq!(r[1], Enqueued::Known);
    let Enqueued::New { id: first, .. } = r[0] else {
        unreachable!()
    };
    let r = q.enqueue(&[nj("/rec/a.wav", 20, 2)], 101).await.unwrap();
    assert!(matches!(r[0], Enqueued::New { supersedes: Some(s), .. } if s == first));
}

#[tokio::test]
async fn claim_walks_the_states_and_never_hands_out_a_job_twice() {
    let (_d, q) = fresh().await;
    q.enqueue(&[nj("/rec/a.wav", 10, 1)], 100).await.unwrap();
    let j = q.claim(100).await.unwrap().unwrap();
    assert_eq!(j.state, State::Declaring);
    assert!(q.claim(100).await.unwrap().is_none(), "claimed twice");
    q.mark_declared(j.id, "iid-1", 101).await.unwrap();
    let j = q.get(j.id).await.unwrap().unwrap();
    assert_eq!(j.state, State::Uploading);
    assert_eq!(j.interaction_id.as_deref(), Some("iid-1"));
    // a transient upload failure: back to declared, later
    q.reschedule(&j, Some("503"), 500, true, 102).await.unwrap();
    assert!(q.claim(499).await.unwrap().is_none());
    let j = q.claim(500).await.unwrap().unwrap();
    assert_eq!(j.state, State::Uploading);
    assert_eq!(j.attempts, 1);
    q.mark_uploaded(j.id, 409, None, 501).await.unwrap();
    let j = q.get(j.id).await.unwrap().unwrap();
    assert_eq!(j.state, State::Uploaded);
    assert_eq!(j.upload_status, Some(409));
    let ev: Vec<String> = q
        .events(j.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.1)
        .collect();
    assert_eq!(ev, ["queued", "declared", "retry", "uploaded"]);
}

#[tokio::test]
async fn mark_declared_can_be_repeated_but_never_changes_the_interaction_id() {
    let (_d, q) = fresh().await;
    q.enqueue(&[nj("/rec/a.wav", 10, 1)], 100).await.unwrap();
    let j = q.claim(100).await.unwrap().unwrap();
    q.mark_declared(j.id, "iid-1", 101).await.unwrap();
    // Again after a failed sync: the same id is accepted, without a second event.
    q.mark_declared(j.id, "iid-1", 102).await.unwrap();
    assert!(q.mark_declared(j.id, "iid-2", 103).await.is_err());
    let j = q.get(j.id).await.unwrap().unwrap();
    assert_eq!(j.interaction_id.as_deref(), Some("iid-1"));
    q.mark_uploaded(j.id, 201, None, 104).await.unwrap();
    let ev: Vec<(i64, String, Option<String>)> = q.events(j.id).await.unwrap();
    assert_eq!(
        ev,
        [
            (100, "queued".to_string(), None),
            (101, "declared".to_string(), Some("iid-1".to_string())),
            (104, "uploaded".to_string(), Some("201".to_string())),
        ]
    );
    // The WAL is there and synced; syncing with nothing new is harmless.
    q.sync_wal().await.unwrap();
}

#[tokio::test]
async fn recover_returns_held_jobs_without_losing_the_interaction_id() {
    let (_d, q) = fresh().await;
    q.enqueue(&[nj("/rec/a.wav", 10, 1), nj("/rec/b.wav", 10, 1)], 100)
        .await
        .unwrap();
    let a = q.claim(100).await.unwrap().unwrap();
    q.mark_declared(a.id, "iid-a", 100).await.unwrap();
    let _b = q.claim(100).await.unwrap().unwrap();
    assert_eq!(q.recover(200).await.unwrap(), (1, 1));
    let a = q.get(a.id).await.unwrap().unwrap();
    assert_eq!(a.state, State::Declared);
    assert_eq!(a.interaction_id.as_deref(), Some("iid-a"));
    let c = q.counts().await.unwrap();
    assert_eq!((c.pending, c.declared), (1, 1));
}

#[tokio::test]
async fn retry_brings_failed_jobs_back_to_the_right_state() {
    let (_d, q) = fresh().await;
    q.enqueue(&[nj("/rec/a.wav", 10, 1), nj("/rec/b.wav", 10, 1)], 100)
        .await
        .unwrap();
    let a = q.claim(100).await.unwrap().unwrap();
    q.fail(&a, "400 bad file", 101).await.unwrap();
    let b = q.claim(100).await.unwrap().unwrap();
    q.mark_declared(b.id, "iid-b", 101).await.unwrap();
    let b = q.get(b.id).await.unwrap().unwrap();
    q.fail(&b, "413", 102).await.unwrap();
    assert_eq!(q.counts().await.unwrap().failed, 2);
    assert_eq!(
        q.get(a.id).await.unwrap().unwrap().last_error.as_deref(),
        Some("400 bad file")
    );
    assert_eq!(q.retry(None, 200).await.unwrap(), 2);
    assert_eq!(q.get(a.id).await.unwrap().unwrap().state, State::Pending);
    assert_eq!(q.get(b.id).await.unwrap().unwrap().state, State::Declared);
}

#[tokio::test]
async fn a_foreign_sqlite_file_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("other.db");
    {
        let opts = SqliteConnectOptions::new()
            .filename(&p)
            .create_if_missing(true);
        let pool = SqlitePool::connect_with(opts).await.unwrap();
        sqlx::query("CREATE TABLE t (x)")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }
    let before = std::fs::read(&p).unwrap();
    let err = Queue::open(&p, OpenMode::Create).await.unwrap_err();
    assert!(err.to_string().contains("did not create"), "{err}");
    assert!(
        std::fs::read(&p).unwrap() == before,
        "the foreign file was modified"
    );
}

#[tokio::test]
async fn a_garbage_file_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("queue.db");
    std::fs::write(&p, b"this is not a database at all, it is a text file").unwrap();
    let err = Queue::open(&p, OpenMode::Create).await.unwrap_err();
    assert!(err.to_string().contains("not a SQLite database"), "{err}");
    assert_eq!(
        std::fs::read(&p).unwrap(),
        b"this is not a database at all, it is a text file"
    );
}

#[tokio::test]
async fn existing_mode_does_not_create() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nope.db");
    let err = Queue::open(&p, OpenMode::Existing).await.unwrap_err();
    assert!(err.to_string().contains("no queue database"), "{err}");
    assert!(!p.exists());
}

#[tokio::test]
async fn a_reader_waits_for_a_schema_the_daemon_has_not_finished_migrating() {
    let (dir, q) = fresh().await;
    let db = dir.path().join("state/queue.db");
    let latest: i64 = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
        .fetch_one(&q.lite().pool)
        .await
        .unwrap();
    // As a reader sees it while the daemon is between two migrations.
    for sql in [
        "CREATE TABLE saved AS SELECT * FROM _sqlx_migrations WHERE version = ?",
        "DELETE FROM _sqlx_migrations WHERE version = ?",
    ] {
        sqlx::query(sql)
            .bind(latest)
            .execute(&q.lite().pool)
            .await
            .unwrap();
    }
    let err = Queue::open(&db, OpenMode::Existing).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("needs {latest}")) && text.contains("callferry run"),
        "{text}"
    );
    // Once the last migration has committed, readers get in.
    for sql in [
        "INSERT INTO _sqlx_migrations SELECT * FROM saved",
        "DROP TABLE saved",
    ] {
        sqlx::query(sql).execute(&q.lite().pool).await.unwrap();
    }
    let reader = Queue::open(&db, OpenMode::Existing).await.unwrap();
    assert_eq!(reader.counts().await.unwrap().total(), 0);
    reader.close().await;
    q.close().await;
}

#[tokio::test]
async fn counts_kept_by_triggers_follow_every_transition() {
    let (_d, q) = fresh().await;
    q.enqueue(
        &[
            nj("/rec/a.wav", 1, 1),
            nj("/rec/b.wav", 1, 1),
            nj("/rec/c.wav", 1, 1),
        ],
        100,
    )
    .await
    .unwrap();
    let j = q.claim(200).await.unwrap().unwrap();
    q.mark_declared(j.id, "4b1b2f5e-0000-4000-8000-000000000001", 201)
        .await
        .unwrap();
    q.mark_uploaded(j.id, 201, None, 202).await.unwrap();
    let k = q.claim(203).await.unwrap().unwrap();
    q.fail(&k, "gone", 204).await.unwrap();
    let c = q.counts().await.unwrap();
    assert_eq!((c.pending, c.uploaded, c.failed, c.total()), (1, 1, 1, 3));
    q.retry(None, 205).await.unwrap();
    let c = q.counts().await.unwrap();
    assert_eq!((c.pending, c.uploaded, c.failed, c.total()), (2, 1, 0, 3));
}

#[tokio::test]
async fn a_pre_zeroed_wal_keeps_every_commit_across_handles_and_reopening() {
    let (dir, q) = fresh().await;
    let db = dir.path().join("state/queue.db");
    q.enqueue(&[nj("/rec/before.wav", 10, 1)], 100)
        .await
        .unwrap();
    q.prepare_wal(1 << 20).await.unwrap();
    let wal = dir.path().join("state/queue.db-wal");
    assert!(std::fs::metadata(&wal).unwrap().len() >= 1 << 20);
    let j = q.claim(101).await.unwrap().unwrap();
    q.mark_declared(j.id, "iid-1", 102).await.unwrap();
    q.enqueue(&[nj("/rec/after.wav", 10, 1)], 103)
        .await
        .unwrap();
    // Another process reads what the daemon wrote into the zeroed WAL.
    let cli = Queue::open(&db, OpenMode::Existing).await.unwrap();
    let c = cli.counts().await.unwrap();
    assert_eq!((c.pending, c.uploading), (1, 1));
    cli.close().await;
    q.close().await;
    // And a fresh start (recovery reads the WAL from its header) finds it all.
    let again = Queue::open(&db, OpenMode::Existing).await.unwrap();
    let j = again.get(j.id).await.unwrap().unwrap();
    assert_eq!(j.interaction_id.as_deref(), Some("iid-1"));
    assert_eq!(again.counts().await.unwrap().total(), 2);
}

#[test]
fn zero_extend_appends_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    std::fs::write(&p, b"frames").unwrap();
    super::walsync::zero_extend(&p, 1000).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(bytes.len(), 1000);
    assert_eq!(&bytes[..6], b"frames");
    assert!(bytes[6..].iter().all(|&b| b == 0));
    // Already long enough: left alone.
    super::walsync::zero_extend(&p, 10).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), bytes);
}

#[tokio::test]
async fn after_a_failed_flush_only_a_whole_checkpoint_proves_durability() {
    use sqlx::Connection;
    let (d, q) = fresh().await;
    q.enqueue(&[nj("/rec/a.wav", 10, 1)], 100).await.unwrap();
    let j = q.claim(100).await.unwrap().unwrap();
    // A reader on an old snapshot: the WAL's later frames cannot be checkpointed past it.
    let mut reader = sqlx::SqliteConnection::connect_with(
        &SqliteConnectOptions::new()
            .filename(d.path().join("state/queue.db"))
            .busy_timeout(Duration::from_millis(50)),
    )
    .await
    .unwrap();
    sqlx::query("BEGIN").execute(&mut reader).await.unwrap();
    sqlx::query("SELECT COUNT(*) FROM jobs")
        .fetch_one(&mut reader)
        .await
        .unwrap();
    q.inject_fault(Fault::Sync, 1);
    let e = q.mark_declared(j.id, "iid-1", 101).await.unwrap_err();
    assert!(e.is_transient() && e.to_string().contains("flush"), "{e}");
    // The id is committed; a flush that now "succeeds" would prove nothing, so the queue insists
    // on a checkpoint, which the reader blocks.
    let e = q.mark_declared(j.id, "iid-1", 102).await.unwrap_err();
    assert!(
        matches!(e, QueueError::NotDurable { .. }) && e.is_transient(),
        "{e}"
    );
    sqlx::query("ROLLBACK").execute(&mut reader).await.unwrap();
    q.mark_declared(j.id, "iid-1", 103).await.unwrap();
    // Proven: everything is in the database file, and later flushes are plain ones again.
    q.sync_wal().await.unwrap();
    let j = q.get(j.id).await.unwrap().unwrap();
    assert_eq!(j.interaction_id.as_deref(), Some("iid-1"));
    assert_eq!(j.state, State::Uploading);
}

#[tokio::test]
async fn injected_write_faults_are_transient_and_a_lost_race_is_not() {
    let (_d, q) = fresh().await;
    q.enqueue(&[nj("/rec/a.wav", 10, 1)], 100).await.unwrap();
    let j = q.claim(100).await.unwrap().unwrap();
    q.inject_fault(Fault::Write, 1);
    let e = q
        .reschedule(&j, Some("x"), 100, true, 100)
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e}");
    q.reschedule(&j, Some("x"), 100, true, 100).await.unwrap();
    let e = q
        .reschedule(&j, Some("x"), 100, true, 100)
        .await
        .unwrap_err();
    assert!(
        matches!(e, QueueError::NotInState { .. }) && !e.is_transient(),
        "{e}"
    );
    // An upload's outcome written twice (the first answer lost) is not a lost race.
    let j = q.claim(100).await.unwrap().unwrap();
    q.mark_declared(j.id, "iid", 101).await.unwrap();
    q.mark_uploaded(j.id, 201, None, 102).await.unwrap();
    q.mark_uploaded(j.id, 201, None, 102).await.unwrap();
    assert_eq!(q.counts().await.unwrap().uploaded, 1);
}

#[tokio::test]
async fn lost_declare_answers_are_counted_per_version_and_in_total() {
    let (_d, q) = fresh().await;
    q.enqueue(&[nj("/rec/a.wav", 10, 1), nj("/rec/b.wav", 10, 1)], 100)
        .await
        .unwrap();
    let a = q.claim(100).await.unwrap().unwrap();
    assert_eq!(q.count_orphan(a.id, "reset", 101).await.unwrap(), 1);
    q.reschedule(&a, Some("reset"), 100, true, 101)
        .await
        .unwrap();
    // Only a job that is declaring can have lost a declare's answer.
    assert!(matches!(
        q.count_orphan(a.id, "reset", 102).await,
        Err(QueueError::NotInState { .. })
    ));
    // A crash with a declare in flight: counted at recovery, on the job and in the total.
    let a = q.claim(100).await.unwrap().unwrap();
    let b = q.claim(100).await.unwrap().unwrap();
    q.mark_declared(b.id, "iid-b", 103).await.unwrap();
    assert_eq!(q.recover(104).await.unwrap(), (1, 1));
    assert_eq!(q.get(a.id).await.unwrap().unwrap().orphans, 2);
    assert_eq!(q.get(b.id).await.unwrap().unwrap().orphans, 0);
    assert_eq!(q.orphan_declares().await.unwrap(), 2);
    // `retry` gives the version a fresh budget; the total stays.
    let a = q.claim(100).await.unwrap().unwrap();
    q.fail(&a, "declared 2 times", 105).await.unwrap();
    assert_eq!(q.retry(Some(&[a.id]), 106).await.unwrap(), 1);
    assert_eq!(q.get(a.id).await.unwrap().unwrap().orphans, 0);
    assert_eq!(q.orphan_declares().await.unwrap(), 2);
}

#[tokio::test]
async fn a_failed_guard_says_what_was_expected_and_what_was_found() {
    use State::*;
    let (_d, q) = fresh().await;
    q.enqueue(&[nj("/rec/a.wav", 10, 1)], 100).await.unwrap();
    let held = q.claim(100).await.unwrap().unwrap();
    q.fail(&held, "400", 101).await.unwrap();
    let failed = q.get(held.id).await.unwrap().unwrap();
    let not_in_state = |e: QueueError| match e {
        QueueError::NotInState {
            job,
            expected,
            found,
        } if job == held.id => (expected, found),
        other => panic!("{other}"),
    };
    // A job that is not held cannot be put back. It once failed as a transient database error,
    // which a worker would have written again every second for ever.
    let e = q
        .reschedule(&failed, None, 200, false, 200)
        .await
        .unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert_eq!(not_in_state(e), (vec![Declaring, Uploading], Some(Failed)));
    let e = q.fail(&failed, "again", 200).await.unwrap_err();
    assert_eq!(not_in_state(e), (vec![Declaring, Uploading], Some(Failed)));
    // The row changed under a worker's copy: the state found is the row's.
    let e = q.fail(&held, "again", 200).await.unwrap_err();
    assert_eq!(not_in_state(e), (vec![Declaring], Some(Failed)));
    let e = q.mark_declared(held.id, "iid", 200).await.unwrap_err();
    assert_eq!(not_in_state(e), (vec![Declaring], Some(Failed)));
    let e = q.mark_uploaded(held.id, 201, None, 200).await.unwrap_err();
    assert_eq!(not_in_state(e), (vec![Uploading], Some(Failed)));
    let e = q.mark_processed(held.id, 200).await.unwrap_err();
    assert_eq!(not_in_state(e), (vec![Uploaded], Some(Failed)));
    let e = q.count_orphan(held.id, "x", 200).await.unwrap_err();
    assert_eq!(not_in_state(e), (vec![Declaring], Some(Failed)));
    assert!(
        e_text(q.fail_following(held.id, "x", None, false, 200).await)
            .contains("is failed, not uploaded")
    );
    // Nothing was written by any of them.
    assert_eq!(
        q.get(held.id).await.unwrap().unwrap().last_error.as_deref(),
        Some("400")
    );
    let gone = q.mark_declared(held.id + 1, "iid", 200).await.unwrap_err();
    assert!(
        matches!(gone, QueueError::NotInState { found: None, .. }),
        "{gone}"
    );
}

fn e_text(r: Result<(), QueueError>) -> String {
    r.unwrap_err().to_string()
}

/// The claim brings the recorder's hook data with the job (one trip to the database, not two),
/// through either claim, and only the hooked job carries it.
#[tokio::test]
async fn a_claim_carries_the_hook_data_of_its_job() {
    let (_d, q) = fresh().await;
    let hooked = nj("/rec/hooked.wav", 10, 1);
    let plain = nj("/rec/plain.wav", 10, 1);
    let call = r#"{"external_id":"call-7","meta":{"agent":"';$(touch /tmp/x)'"}}"#;
    q.enqueue(std::slice::from_ref(&plain), 100).await.unwrap();
    assert!(matches!(
        q.enqueue_hooked(&hooked, call, 100).await.unwrap(),
        Hooked::Attached { new: true, .. }
    ));
    let first = q.claim(200).await.unwrap().unwrap();
    let second = q
        .claim_except(200, &["/elsewhere".into()])
        .await
        .unwrap()
        .unwrap();
    let (h, p) = if first.path.ends_with("hooked.wav") {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(h.hook.as_deref(), Some(call));
    assert_eq!(p.hook, None);
    assert_eq!(q.hook_of(h.id).await.unwrap().as_deref(), Some(call));
    // A job read for a listing does not carry it (only claims do).
    assert_eq!(q.get(h.id).await.unwrap().unwrap().hook, None);
}
