//! The PostgreSQL queue's claims, leases and fences, against a real PostgreSQL started
//! by the test itself (`callferry::pgcluster`): several daemons' handles on one database, each
//! racing the others the way daemons on several hosts would. These tests never skip: without a
//! server they fail, saying how to get one.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use callferry::pgcluster::PgCluster;
use callferry::queue::pg::{Held, PgQueue};
use callferry::queue::{Enqueued, NewJob, QueueError, State};
use proptest::prelude::*;

fn server() -> &'static PgCluster {
    PgCluster::shared().unwrap_or_else(|e| panic!("PostgreSQL test server: {e}"))
}

async fn daemons(url: &str, n: usize, lease: Duration) -> Vec<PgQueue> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(
            PgQueue::connect(url, &format!("d{i}"), &format!("host{i}"), lease)
                .await
                .expect("connect"),
        );
    }
    out
}

fn version(i: usize) -> NewJob {
    NewJob {
        path: PathBuf::from(format!("/spool/2026/12/05/call-{i}.wav")),
        root: PathBuf::from("/spool"),
        size: 1000 + i as u64,
        mtime_ns: 1_764_900_000_000_000_000 + i as i64,
        dev: 40 + i as u64 % 3, // differs per NFS client: never part of the identity
        ino: 7000 + i as u64,
    }
}

/// Makes a job's lease run out now, as if its holder had been paused or cut off for longer than
/// the lease: the database's clock decides, so this is what a late wake-up looks like to it.
async fn expire(url: &str, id: i64) {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    sqlx::query("UPDATE jobs SET lease_until = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_starting_together_migrate_once_and_queue_a_version_once() {
    let url = server().fresh_db().unwrap();
    let starts = (0..3).map(|i| {
        let url = url.clone();
        tokio::spawn(async move {
            PgQueue::connect(&url, &format!("d{i}"), "h", Duration::from_secs(30)).await
        })
    });
    let mut ds = Vec::new();
    for s in starts {
        ds.push(s.await.unwrap().expect("each daemon connects and migrates"));
    }
    // The same ten recordings, found by all three daemons at the same time.
    let batch: Vec<NewJob> = (0..10).map(version).collect();
    let finds = ds.iter().map(|d| d.enqueue(&batch, 1));
    let results = futures_util::future::join_all(finds).await;
    let mut new = 0;
    for r in results {
        for e in r.expect("enqueue") {
            if matches!(e, Enqueued::New { .. }) {
                new += 1;
            }
        }
    }
    assert_eq!(
        new, 10,
        "each version is one job, whichever daemon found it first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_never_hand_one_job_to_two_daemons() {
    let url = server().fresh_db().unwrap();
    let ds = daemons(&url, 3, Duration::from_secs(60)).await;
    let batch: Vec<NewJob> = (0..150).map(version).collect();
    ds[0].enqueue(&batch, 1).await.unwrap();
    let ds = std::sync::Arc::new(ds);
    let mut tasks = Vec::new();
    for d in 0..3 {
        for _worker in 0..3 {
            let ds = ds.clone();
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                while let Some(h) = ds[d].claim(10).await.expect("claim") {
                    assert_eq!(h.job.state, State::Declaring);
                    ds[d]
                        .mark_declared(&h, &format!("i-{}", h.job.id), None, 11)
                        .await
                        .expect("an unshared claim commits");
                    mine.push(h.job.id);
                }
                mine
            }));
        }
    }
    let mut seen = HashSet::new();
    for t in tasks {
        for id in t.await.unwrap() {
            assert!(seen.insert(id), "job {id} was claimed twice");
        }
    }
    assert_eq!(seen.len(), 150, "every due job was claimed");
}

#[tokio::test]
async fn a_daemon_that_wakes_up_after_a_takeover_cannot_commit() {
    let url = server().fresh_db().unwrap();
    let ds = daemons(&url, 2, Duration::from_secs(30)).await;
    ds[0].enqueue(&[version(1)], 1).await.unwrap();
    let a = ds[0].claim(2).await.unwrap().expect("a due job");
    // A is paused past its lease; B takes the job over and declares it.
    expire(&url, a.job.id).await;
    assert_eq!(ds[1].reap_expired(3).await.unwrap(), 1);
    let after = ds[1].get(a.job.id).await.unwrap().unwrap();
    assert_eq!(after.state, State::Pending);
    assert_eq!(
        after.orphans, 1,
        "A's declare may have reached ElevateAI: counted"
    );
    let b = ds[1].claim(4).await.unwrap().expect("taken over");
    assert!(b.fence > a.fence);
    ds[1].mark_declared(&b, "from-b", None, 5).await.unwrap();
    // A wakes up with the answer to its own declare.
    let late = ds[0].mark_declared(&a, "from-a", None, 6).await;
    assert!(
        matches!(late, Err(QueueError::LostClaim { .. })),
        "{late:?}"
    );
    let late = ds[0].fail(&a, "late failure", 6).await;
    assert!(
        matches!(late, Err(QueueError::LostClaim { .. })),
        "{late:?}"
    );
    let job = ds[1].get(a.job.id).await.unwrap().unwrap();
    assert_eq!(job.interaction_id.as_deref(), Some("from-b"));
    assert_eq!(job.state, State::Uploading);
    assert_eq!(
        ds[1].holder(job.id).await.unwrap().as_deref(),
        Some(ds[1].instance())
    );
}

#[tokio::test]
async fn an_upload_taken_over_goes_again_on_the_same_interaction() {
    let url = server().fresh_db().unwrap();
    let ds = daemons(&url, 2, Duration::from_secs(30)).await;
    ds[0].enqueue(&[version(1)], 1).await.unwrap();
    let a = ds[0].claim(2).await.unwrap().unwrap();
    ds[0].mark_declared(&a, "i-1", None, 3).await.unwrap();
    assert_eq!(
        ds[0].claim(4).await.unwrap().map(|h| h.job.id),
        None,
        "held, not due"
    );
    let job = ds[0].get(a.job.id).await.unwrap().unwrap();
    assert_eq!(job.state, State::Uploading);
    expire(&url, a.job.id).await;
    assert_eq!(ds[1].reap_expired(5).await.unwrap(), 1);
    let b = ds[1]
        .claim(6)
        .await
        .unwrap()
        .expect("the upload is taken over");
    assert_eq!(b.job.state, State::Uploading);
    assert_eq!(b.job.interaction_id.as_deref(), Some("i-1"));
    assert_eq!(
        b.job.orphans, 0,
        "an upload taken over leaves no orphan declare"
    );
    ds[1].mark_uploaded(&b, 409, 7).await.unwrap();
    let late = ds[0].mark_uploaded(&a, 201, 8).await;
    assert!(
        matches!(late, Err(QueueError::LostClaim { .. })),
        "{late:?}"
    );
}

#[tokio::test]
async fn a_heartbeat_renews_every_claim_its_daemon_holds() {
    let url = server().fresh_db().unwrap();
    let ds = daemons(&url, 2, Duration::from_secs(30)).await;
    ds[0]
        .enqueue(&(0..3).map(version).collect::<Vec<_>>(), 1)
        .await
        .unwrap();
    let held: Vec<Held> = vec![
        ds[0].claim(2).await.unwrap().unwrap(),
        ds[0].claim(2).await.unwrap().unwrap(),
    ];
    let _other = ds[1].claim(2).await.unwrap().unwrap();
    for h in &held {
        expire(&url, h.job.id).await;
    }
    assert_eq!(
        ds[0].heartbeat().await.unwrap(),
        2,
        "its own two, not the other's"
    );
    assert_eq!(
        ds[1].reap_expired(3).await.unwrap(),
        0,
        "renewed: nothing to take over"
    );
}

#[tokio::test]
async fn a_role_has_one_holder_and_fails_over() {
    let url = server().fresh_db().unwrap();
    let ds = daemons(&url, 2, Duration::from_secs(30)).await;
    assert_eq!(ds[0].take_role("rescan").await.unwrap(), Some(1));
    assert_eq!(ds[1].take_role("rescan").await.unwrap(), None);
    assert_eq!(
        ds[0].take_role("rescan").await.unwrap(),
        Some(1),
        "renewed, same fence"
    );
    // The holder dies: its lease runs out and the other takes the role, under a new fence.
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query("UPDATE roles SET lease_until = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(ds[1].take_role("rescan").await.unwrap(), Some(2));
    assert_eq!(ds[0].take_role("rescan").await.unwrap(), None);
    // A graceful stop hands it over at once.
    ds[1].stop().await.unwrap();
    assert_eq!(ds[0].take_role("rescan").await.unwrap(), Some(3));
}

#[tokio::test]
async fn status_sees_the_whole_cluster_and_what_each_daemon_holds() {
    let url = server().fresh_db().unwrap();
    let ds = daemons(&url, 3, Duration::from_secs(30)).await;
    ds[0]
        .enqueue(&(0..5).map(version).collect::<Vec<_>>(), 1)
        .await
        .unwrap();
    let a = ds[0].claim(2).await.unwrap().unwrap();
    ds[0].mark_declared(&a, "i-a", None, 3).await.unwrap();
    ds[1].claim(2).await.unwrap().unwrap();
    ds[1].claim(2).await.unwrap().unwrap();
    ds[2].stop().await.unwrap();
    let c = ds[2].counts().await.unwrap();
    assert_eq!(
        (c.pending, c.uploading),
        (4, 1),
        "declaring counts as pending: {c:?}"
    );
    assert_eq!(ds[2].next_due().await.unwrap(), Some(1));
    let listed = ds[2].list(Some(State::Uploading), 10).await.unwrap();
    assert_eq!(
        listed.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![a.job.id]
    );
    assert_eq!(
        ds[2].list(None, 3).await.unwrap().len(),
        3,
        "the limit holds"
    );
    let members = ds[2].members(Duration::from_secs(60)).await.unwrap();
    let held: HashMap<&str, (u64, bool, &str)> = members
        .iter()
        .map(|m| (m.name.as_str(), (m.held, m.stopped, m.host.as_str())))
        .collect();
    assert_eq!(held["d0"], (1, false, "host0"));
    assert_eq!(held["d1"], (2, false, "host1"));
    assert_eq!(held["d2"], (0, true, "host2"));
}

#[derive(Debug, Clone)]
enum Op {
    /// Daemon d claims the next due job.
    Claim(usize),
    /// Daemon d commits the next outcome for its k-th oldest claim (declared, then uploaded).
    Commit(usize, usize),
    /// Daemon d gives up its k-th claim (a 5xx: back to wait).
    PutBack(usize, usize),
    /// Daemon d is paused past its leases: they all run out.
    Pause(usize),
    /// Daemon d reaps expired leases.
    Reap(usize),
    /// Daemon d renews its leases.
    Heartbeat(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3usize).prop_map(Op::Claim),
        4 => (0..3usize, 0..3usize).prop_map(|(d, k)| Op::Commit(d, k)),
        1 => (0..3usize, 0..3usize).prop_map(|(d, k)| Op::PutBack(d, k)),
        1 => (0..3usize).prop_map(Op::Pause),
        2 => (0..3usize).prop_map(Op::Reap),
        1 => (0..3usize).prop_map(Op::Heartbeat),
    ]
}

/// Any interleaving of three daemons claiming, committing, giving up, being paused past their
/// leases, reaping and renewing keeps the promises, checked against the table itself:
/// - a commit succeeds only for the claim the job's fence names, so at any moment one daemon
///   at most can act on a job;
/// - a job is declared successfully at most once per declaring claim that was not taken over,
///   i.e. a second interaction only where a takeover counted an orphan (the lost-answer floor);
/// - a job's interaction id never changes once committed, and an uploaded job stays uploaded.
#[test]
fn any_interleaving_of_three_daemons_keeps_claims_exclusive() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = server().fresh_db().unwrap();
    let cases: u32 = std::env::var("CALLFERRY_PG_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let ds = rt.block_on(daemons(&url, 3, Duration::from_secs(3600)));
    let admin = rt.block_on(sqlx::PgPool::connect(&url)).unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&proptest::collection::vec(op(), 1..40), |ops| {
            rt.block_on(async {
                sqlx::query("TRUNCATE jobs RESTART IDENTITY CASCADE")
                    .execute(&admin)
                    .await
                    .unwrap();
                ds[0]
                    .enqueue(&(0..4).map(version).collect::<Vec<_>>(), 0)
                    .await
                    .unwrap();
                run_ops(&ds, &admin, &ops).await
            })
        })
        .unwrap();
}

async fn run_ops(ds: &[PgQueue], admin: &sqlx::PgPool, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut claims: Vec<Vec<Held>> = vec![Vec::new(); ds.len()];
    // Successful declares per job, and the orphans counted for it by takeovers.
    let mut declared: HashMap<i64, u32> = HashMap::new();
    let mut ids: HashMap<i64, String> = HashMap::new();
    let mut uploaded: HashSet<i64> = HashSet::new();
    for (n, op) in ops.iter().enumerate() {
        let now = 1 + n as i64;
        match *op {
            Op::Claim(d) => {
                if let Some(h) = ds[d].claim(now).await.unwrap() {
                    claims[d].push(h);
                }
            }
            Op::Commit(d, k) | Op::PutBack(d, k) if k < claims[d].len() => {
                let h = claims[d].remove(k);
                let fence: i64 = sqlx::query_scalar("SELECT fence FROM jobs WHERE id = $1")
                    .bind(h.job.id)
                    .fetch_one(admin)
                    .await
                    .unwrap();
                let r = match (op, h.job.state) {
                    (Op::PutBack(..), _) => ds[d].reschedule(&h, 0, "5xx", now).await,
                    (_, State::Declaring) => {
                        let iid = format!("i-{}-{}", h.job.id, h.fence);
                        let r = ds[d].mark_declared(&h, &iid, None, now).await;
                        if r.is_ok() {
                            *declared.entry(h.job.id).or_default() += 1;
                            ids.insert(h.job.id, iid);
                        }
                        r
                    }
                    _ => {
                        let r = ds[d].mark_uploaded(&h, 201, now).await;
                        if r.is_ok() {
                            uploaded.insert(h.job.id);
                        }
                        r
                    }
                };
                // The fence decides, and nothing else: a current claim commits, a stale one
                // is refused as lost.
                if fence == h.fence {
                    prop_assert!(r.is_ok(), "current claim refused: {r:?} ({op:?})");
                } else {
                    prop_assert!(
                        matches!(r, Err(QueueError::LostClaim { .. })),
                        "stale claim (fence {} < {fence}) got {r:?}",
                        h.fence
                    );
                }
            }
            Op::Commit(..) | Op::PutBack(..) => {}
            Op::Pause(d) => {
                sqlx::query(
                    "UPDATE jobs SET lease_until = now() - interval '1 second' WHERE holder = $1",
                )
                .bind(ds[d].instance())
                .execute(admin)
                .await
                .unwrap();
            }
            Op::Reap(d) => {
                ds[d].reap_expired(now).await.unwrap();
            }
            Op::Heartbeat(d) => {
                ds[d].heartbeat().await.unwrap();
            }
        }
        // After every step, from the table: what each job looks like now.
        for id in 1..=4i64 {
            let j = ds[0].get(id).await.unwrap().unwrap();
            let count = declared.get(&id).copied().unwrap_or(0);
            prop_assert!(
                count <= 1 + j.orphans,
                "job {id} declared {count} times with {} orphans counted",
                j.orphans
            );
            if let Some(iid) = ids.get(&id) {
                prop_assert_eq!(j.interaction_id.as_ref(), Some(iid), "job {}", id);
            }
            if uploaded.contains(&id) {
                prop_assert_eq!(j.state, State::Uploaded, "job {}", id);
            }
        }
    }
    Ok(())
}

/// Through [`callferry::queue::Queue`], as the workers use it (jobs named by id, the fence kept
/// inside): one daemon whose claim was taken over while its worker still works on it, and which
/// then claims the same job again, must not let the old worker commit under the new claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_never_holds_two_claims_of_one_job_and_a_stale_worker_cannot_commit() {
    use callferry::queue::Queue;
    let url = server().fresh_db().unwrap();
    let q = Queue::connect_pg(&url, "d", "h", Duration::from_secs(30))
        .await
        .unwrap();
    q.enqueue(&[version(1)], 1).await.unwrap();
    let job = q.claim(2).await.unwrap().expect("claimed");
    // The daemon could not renew in time: another daemon's reaper puts the job back.
    expire(&url, job.id).await;
    let other = PgQueue::connect(&url, "e", "h2", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(other.reap_expired(3).await.unwrap(), 1);
    // Its declare may have reached the service: counted, as a restart's recovery counts it.
    assert_eq!(q.orphan_declares().await.unwrap(), 1);
    let events: Vec<String> = q
        .events(job.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.1)
        .collect();
    assert_eq!(events, ["queued", "taken-over"]);
    // The same daemon's next claim finds it again, and hands it back rather than hold it twice.
    assert!(q.claim(4).await.unwrap().is_none());
    assert_eq!(q.claims_held(), 1, "only the old claim, still its worker's");
    let back = q.get(job.id).await.unwrap().unwrap();
    assert_eq!(back.state, State::Pending);
    assert!(back.next_attempt_at > 4, "not due again at once");
    // The old worker's late outcome is refused and its claim forgotten.
    let late = q.mark_declared(job.id, "late", 5).await;
    assert!(
        matches!(late, Err(QueueError::LostClaim { .. })),
        "{late:?}"
    );
    assert_eq!(q.claims_held(), 0);
    let again = q
        .claim(back.next_attempt_at)
        .await
        .unwrap()
        .expect("claimed again");
    q.mark_declared(again.id, "i-1", 6).await.unwrap();
    q.mark_uploaded(again.id, 201, None, 7).await.unwrap();
    let done = q.get(job.id).await.unwrap().unwrap();
    assert_eq!(
        (done.state, done.interaction_id.as_deref()),
        (State::Uploaded, Some("i-1"))
    );
    assert_eq!(q.claims_held(), 0);
}

/// Marks every job uploaded long ago, as the years before a prune would leave them.
async fn age_all_uploaded(url: &str) {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    sqlx::query(
        "UPDATE jobs SET state = 'uploaded', interaction_id = 'i-' || id, upload_status = 201, \
         updated_at = 1, uploaded_at = 1",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pruned_version_is_never_queued_again_even_by_a_rescan_racing_the_prune() {
    const N: usize = 200;
    const ROUNDS: usize = 8;
    let url = server().fresh_db().unwrap();
    let ds = std::sync::Arc::new(daemons(&url, 3, Duration::from_secs(30)).await);
    let mut pruned = 0;
    for round in 0..ROUNDS {
        let all: Vec<NewJob> = (round * N..(round + 1) * N).map(version).collect();
        ds[0].enqueue(&all, 1).await.unwrap();
        age_all_uploaded(&url).await;
        // Two daemons' rescans queue every version again, over and over, while the third prunes:
        // a version must be a job or a fingerprint at every instant, never neither.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let rescans: Vec<_> = (1..3)
            .map(|d| {
                let (ds, all, stop) = (ds.clone(), all.clone(), stop.clone());
                let calls = calls.clone();
                tokio::spawn(async move {
                    let mut new = Vec::new();
                    let mut passes = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) || passes == 0 {
                        for j in &all {
                            let r = ds[d].enqueue(std::slice::from_ref(j), 200).await.unwrap();
                            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if let Enqueued::New { id, .. } = r[0] {
                                new.push((j.path.clone(), id));
                            }
                        }
                        passes += 1;
                    }
                    new
                })
            })
            .collect();
        // The prune starts once both rescans are under way.
        while calls.load(std::sync::atomic::Ordering::Relaxed) < 20 {
            tokio::task::yield_now().await;
        }
        pruned += ds[0].prune(100, true).await.unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for r in rescans {
            let new = r.await.unwrap();
            assert!(
                new.is_empty(),
                "round {round}: pruned versions queued again: {new:?}"
            );
        }
        let counts = ds[2].counts().await.unwrap();
        assert_eq!(counts.total(), 0, "round {round}: {counts:?}");
    }
    assert_eq!(pruned, (N * ROUNDS) as u64, "every old job pruned");
    // The fingerprints keep them known: a rescan after the prune skips each file too.
    let all: Vec<NewJob> = (0..N).map(version).collect();
    let again = ds[2].enqueue(&all, 9_999).await.unwrap();
    assert!(again.iter().all(|e| matches!(e, Enqueued::Known)));
    assert!(ds[2].known_fingerprints().await.unwrap().len() >= 2 * N * ROUNDS);
    // A new version of one of them (rewritten since) is a new job, and a later call at a
    // pruned path is told apart for its results' names.
    let mut newer = version(7);
    newer.mtime_ns += 1;
    let r = ds[1]
        .enqueue(std::slice::from_ref(&newer), 10_000)
        .await
        .unwrap();
    let Enqueued::New { id, .. } = r[0] else {
        panic!("a new version is a new job: {r:?}")
    };
    let job = ds[1].get(id).await.unwrap().unwrap();
    assert!(ds[1].earlier_call_at_path(&job).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_keeps_failed_followed_and_recent_jobs() {
    let url = server().fresh_db().unwrap();
    let ds = daemons(&url, 1, Duration::from_secs(30)).await;
    ds[0]
        .enqueue(&(0..4).map(version).collect::<Vec<_>>(), 1)
        .await
        .unwrap();
    age_all_uploaded(&url).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    for sql in [
        "UPDATE jobs SET state = 'failed' WHERE id = 1",
        "UPDATE jobs SET follow_at = 5 WHERE id = 2",
        "UPDATE jobs SET updated_at = 500 WHERE id = 3",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    pool.close().await;
    assert_eq!(ds[0].prune(100, true).await.unwrap(), 1);
    let left: Vec<i64> = ds[0]
        .list(None, 10)
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(left, [3, 2, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_learns_which_members_watch_other_folders() {
    let url = server().fresh_db().unwrap();
    let ds = daemons(&url, 3, Duration::from_secs(30)).await;
    let spool = [PathBuf::from("/spool/b"), PathBuf::from("/spool/a")];
    assert!(ds[0].announce_roots(&spool).await.unwrap().is_empty());
    // The same folders in another order: the same spool.
    let same = [PathBuf::from("/spool/a"), PathBuf::from("/spool/b")];
    assert!(ds[1].announce_roots(&same).await.unwrap().is_empty());
    // A host that mounted the spool elsewhere is told about both others.
    let elsewhere = ds[2]
        .announce_roots(&[PathBuf::from("/mnt/spool/a"), PathBuf::from("/mnt/spool/b")])
        .await
        .unwrap();
    let names: Vec<&str> = elsewhere.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["d0", "d1"]);
    assert_eq!(elsewhere[0].2, ["/spool/a", "/spool/b"]);
    // A member that stopped is no longer compared.
    ds[0].stop().await.unwrap();
    let after = ds[2]
        .announce_roots(&[PathBuf::from("/mnt/spool/a")])
        .await
        .unwrap();
    assert_eq!(after.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_queue_is_reached_over_tls_and_the_server_is_verified() {
    let (pg, ca) =
        PgCluster::start_tls().unwrap_or_else(|e| panic!("PostgreSQL test server with TLS: {e}"));
    pg.create_db("tls").unwrap();
    let lease = Duration::from_secs(30);
    let url = pg.tcp_url("tls", "verify-full", Some(&ca));
    let q = PgQueue::connect(&url, "d0", "h0", lease)
        .await
        .expect("connects over TLS, the server's certificate checked against the CA");
    q.enqueue(&[version(1)], 1).await.unwrap();
    // The session is encrypted: the server says so.
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ssl, "TLS in use");
    pool.close().await;
    // A server whose certificate no trusted CA signed (a man in the middle, to this client) is
    // refused: the test CA is not among the system's.
    let err = PgQueue::attach(&pg.tcp_url("tls", "verify-full", None), lease)
        .await
        .expect_err("an unknown CA is refused");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "says why: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_daemon_hears_of_new_work_as_it_is_committed() {
    let url = server().fresh_db().unwrap();
    let ds = daemons(&url, 2, Duration::from_secs(3)).await;
    let mut heard = ds[1].work_listener().await.unwrap();
    async fn next(l: &mut sqlx::postgres::PgListener) -> sqlx::postgres::PgNotification {
        tokio::time::timeout(Duration::from_secs(30), l.recv())
            .await
            .expect("a notification within 30 s")
            .unwrap()
    }
    // Queued by another daemon.
    ds[0].enqueue(&[version(1)], 1).await.unwrap();
    assert_eq!(
        next(&mut heard).await.channel(),
        callferry::queue::pg::WORK_CHANNEL
    );
    // Put back by a takeover (its holder stopped renewing).
    let held = ds[0].claim(2).await.unwrap().unwrap();
    expire(&url, held.job.id).await;
    assert_eq!(ds[0].reap_expired(3).await.unwrap(), 1);
    next(&mut heard).await;
}
