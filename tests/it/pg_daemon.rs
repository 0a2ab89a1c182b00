//! The daemon and the commands on the PostgreSQL queue, against the fake and a real
//! throwaway PostgreSQL server (`callferry::pgcluster`, never skipped): end to end on one daemon,
//! two daemons sharing one folder and one database, and a `kill -9`ed daemon's job taken over
//! after its lease. What was stored is checked in the fake's own records.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use callferry::app::{self, AppError, Handle};
use callferry::pgcluster::PgCluster;
use callferry::queue::{Job, Queue};
use callferry_fake::{Endpoint, FakeApi, FakeOptions, Fault};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::hardening::proc::{Daemon, ShowLogOnPanic, callferry};
use crate::helpers::{
    DEADLINE, TOKEN, config_text, eventually, load_config, poll_for, sha256, wav,
};

fn server() -> &'static PgCluster {
    PgCluster::shared().unwrap_or_else(|e| panic!("PostgreSQL test server: {e}"))
}

/// One spool (a folder, the fake, a database) that daemons are started on.
struct Spool {
    dir: tempfile::TempDir,
    rec: PathBuf,
    fake: FakeApi,
    url: String,
}

impl Spool {
    async fn new() -> Spool {
        Spool::with(FakeOptions {
            token: TOKEN.into(),
            ..Default::default()
        })
        .await
    }

    async fn with(fake: FakeOptions) -> Spool {
        Spool::on(server().fresh_db().unwrap(), fake).await
    }

    /// A spool whose queue is the database at `url` (a server of the test's own).
    async fn on(url: String, fake: FakeOptions) -> Spool {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("rec");
        std::fs::create_dir_all(&rec).unwrap();
        let fake = FakeApi::start(fake).await.unwrap();
        Spool {
            dir,
            rec,
            fake,
            url,
        }
    }

    /// The configuration a daemon of this spool runs with (each with its own state folder, which
    /// the PostgreSQL queue does not use).
    fn config_text(&self, extra: &str) -> String {
        config_text(
            &self.fake.base_url(),
            self.dir.path(),
            &format!(
                "[queue]\ndatabase = \"{}\"\nlease = \"3s\"\n{extra}",
                self.url
            ),
        )
    }

    fn config_file(&self, name: &str, extra: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, self.config_text(extra)).unwrap();
        p
    }

    async fn start(&self, extra: &str) -> Node {
        let cfg = load_config(&self.config_text(extra));
        let shutdown = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(app::run(cfg, shutdown.clone(), Some(tx)));
        match tokio::time::timeout(DEADLINE, rx).await {
            Ok(Ok(handle)) => Node {
                shutdown,
                task: Some(task),
                handle,
            },
            _ => panic!("daemon did not start: {:?}", task.await),
        }
    }

    fn drop_file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let dest = self.rec.join(name);
        let tmp = self.rec.join(format!(".{name}.part"));
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, &dest).unwrap();
        dest
    }

    /// The queue as a command sees it.
    async fn queue(&self) -> Queue {
        Queue::attach_pg(&self.url, Duration::from_secs(3))
            .await
            .unwrap()
    }

    async fn wait_state(&self, q: &Queue, path: &Path, state: &str) -> Job {
        let want = path.to_string_lossy().into_owned();
        poll_for(&format!("{want} to be {state}"), || async {
            q.list(None, 10_000)
                .await
                .unwrap()
                .into_iter()
                .find(|j| j.path == want && j.state.public().as_str() == state)
        })
        .await
    }

    /// The fake stored `bytes` under `name` once, on one interaction.
    fn assert_stored_once(&self, name: &str, bytes: &[u8]) {
        let stored: Vec<_> = self
            .fake
            .interactions()
            .into_iter()
            .flat_map(|i| i.uploads)
            .filter(|u| u.stored && u.field_name == name)
            .collect();
        assert_eq!(stored.len(), 1, "{name} stored once: {stored:?}");
        assert_eq!(stored[0].sha256, sha256(bytes), "{name}: bytes intact");
    }

    /// Runs `callferry --config CFG ARGS...` to the end: (exit code, stdout).
    async fn command(&self, cfg: &Path, args: &[&str]) -> (i32, String) {
        let (code, out, _) = self.command_err(cfg, args).await;
        (code, out)
    }

    /// [`Spool::command`], with stderr too.
    async fn command_err(&self, cfg: &Path, args: &[&str]) -> (i32, String, String) {
        let out = callferry()
            .arg("--config")
            .arg(cfg)
            .args(args)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains(&self.url),
            "no URL in the output: {stderr}"
        );
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr.into_owned(),
        )
    }
}

struct Node {
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), AppError>>>,
    handle: Handle,
}

impl Node {
    async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.await.unwrap().expect("daemon stopped with an error");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_and_the_commands_work_end_to_end_on_postgresql() {
    let spool = Spool::new().await;
    let cfg = spool.config_file("callferry.toml", "");
    let q = spool.queue().await;

    // `enqueue` with no daemon running: queued in the shared database.
    let e0 = wav(0.4);
    let p0 = spool.rec.join("e0.wav");
    std::fs::write(&p0, &e0).unwrap();
    // Written a while ago, as a backfill is: past the settle time.
    let old = std::time::SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&p0)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let (code, out, err) = spool
        .command_err(&cfg, &["enqueue", p0.to_str().unwrap()])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("queued"), "{out}");
    assert_eq!(q.counts().await.unwrap().pending, 1);

    let mut node = spool.start("").await;
    spool.wait_state(&q, &p0, "uploaded").await;

    // A lost answer after the audio was stored: the retry's 409 is "uploaded".
    spool
        .fake
        .push_fault(Endpoint::Upload, Fault::ResetAfterStore);
    let a = wav(0.5);
    let pa = spool.drop_file("a.wav", &a);
    let job = spool.wait_state(&q, &pa, "uploaded").await;
    assert_eq!(job.upload_status, Some(409));
    let events: Vec<String> = q
        .events(job.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.1)
        .collect();
    assert_eq!(events, ["queued", "declared", "retry", "uploaded"]);

    // A server error is retried on the same interaction.
    spool.fake.push_fault(Endpoint::Upload, Fault::Status(500));
    let b = wav(0.6);
    let pb = spool.drop_file("b.wav", &b);
    let job = spool.wait_state(&q, &pb, "uploaded").await;
    assert_eq!(job.attempts, 1, "the 500 counted one attempt");

    // A refusal fails the job; `callferry retry` (another process) brings it back.
    spool.fake.push_fault(Endpoint::Declare, Fault::Status(400));
    let c = wav(0.7);
    let pc = spool.drop_file("c.wav", &c);
    let failed = spool.wait_state(&q, &pc, "failed").await;
    assert!(failed.last_error.unwrap().contains("400"));
    let (code, out) = spool.command(&cfg, &["retry", "--failed"]).await;
    assert_eq!((code, out.as_str()), (0, "1 job(s) back in the queue\n"));
    spool.wait_state(&q, &pc, "uploaded").await;

    for (name, bytes) in [("e0.wav", &e0), ("a.wav", &a), ("b.wav", &b), ("c.wav", &c)] {
        spool.assert_stored_once(name, bytes);
    }
    // The refused declare created nothing; every file has one interaction.
    assert_eq!(spool.fake.counters().declares, 5);
    assert_eq!(spool.fake.interactions().len(), 4, "no file declared twice");

    // `status` and `list` read the shared queue.
    let (code, out) = spool.command(&cfg, &["status", "--json"]).await;
    assert_eq!(code, 0, "{out}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["counts"]["uploaded"], 4, "{status}");
    // The cluster: the running daemon, its host, nothing held once idle.
    assert_eq!(status["daemon_running"], true, "{status}");
    let members = status["cluster"].as_array().expect("cluster listed");
    assert_eq!(members.len(), 1, "the commands do not join: {status}");
    assert_eq!(members[0]["stopped"], false);
    assert_eq!(members[0]["held"], 0);
    // One daemon alone holds every role its configuration wants (rescans are on, results off).
    let roles = members[0]["roles"]
        .as_array()
        .expect("roles listed")
        .clone();
    assert!(roles.contains(&"rescan".into()), "{status}");
    assert!(!roles.contains(&"results".into()), "{status}");
    let (code, text) = spool.command(&cfg, &["status"]).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("member "), "{text}");
    assert!(text.contains("does prune, rescan"), "{text}");
    let (code, out) = spool.command(&cfg, &["list", "--json"]).await;
    assert_eq!(code, 0, "{out}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(4), "{list}");

    let me = node.handle.queue.cluster().unwrap().instance().to_string();
    node.stop().await;
    let members = q
        .cluster()
        .unwrap()
        .members(Duration::from_secs(3600))
        .await
        .unwrap();
    let m = members
        .iter()
        .find(|m| m.id == me)
        .expect("the daemon is a member");
    assert!(m.stopped, "a graceful stop says goodbye: {m:?}");
    assert_eq!(m.held, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_on_one_folder_and_one_database_store_each_recording_once() {
    const N: usize = 24;
    let spool = Spool::new().await;
    let q = spool.queue().await;
    let mut a = spool.start("").await;
    let mut b = spool.start("").await;
    let files: Vec<(String, Vec<u8>)> = (0..N)
        .map(|i| (format!("call-{i:02}.wav"), wav(0.2 + i as f64 * 0.01)))
        .collect();
    for (name, bytes) in &files {
        spool.drop_file(name, bytes);
    }
    eventually("every recording uploaded", || async {
        q.counts().await.unwrap().uploaded == N as u64
    })
    .await;
    for (name, bytes) in &files {
        spool.assert_stored_once(name, bytes);
    }
    // Both daemons found every file; each version is still one job and one declare.
    assert_eq!(q.counts().await.unwrap().total(), N as u64);
    assert_eq!(
        spool.fake.interactions().len(),
        N,
        "no recording declared twice"
    );
    assert_eq!(spool.fake.counters().declares, N as u64);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_while_uploading_has_its_job_taken_over_after_the_lease() {
    let spool = Spool::new().await;
    let q = spool.queue().await;
    // The first daemon's upload hangs at the fake (longer than the test), so it holds the job
    // when it is killed.
    let cfg = spool.config_file("first.toml", "[api]\nstall_timeout = \"120s\"\n");
    let log = spool.dir.path().join("first.log");
    let _show = ShowLogOnPanic(log.clone());
    spool
        .fake
        .push_fault(Endpoint::Upload, Fault::Stall(Duration::from_secs(120)));
    let mut first = Daemon::spawn(&cfg, &log, &[]);
    let x = wav(0.5);
    let px = spool.drop_file("x.wav", &x);
    eventually("the first daemon's upload to reach the fake", || async {
        spool.fake.counters().faults_injected == 1
    })
    .await;
    let held = spool.wait_state(&q, &px, "uploading").await;
    let holder = q.cluster().unwrap().holder(held.id).await.unwrap();
    assert!(holder.is_some(), "the job is held");
    // `list` says which daemon holds it (by its host's name).
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let host = host.trim();
    assert_eq!(held.held_by.as_deref(), Some(host));
    let (code, listed) = spool.command(&cfg, &["list"]).await;
    assert_eq!(code, 0);
    assert!(listed.contains(&format!("held by {host}")), "{listed}");
    let (_, json) = spool.command(&cfg, &["list", "--json"]).await;
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json[0]["held_by"], host, "{json}");
    first.kill9().await;
    let killed = Instant::now();

    let mut second = spool.start("").await;
    let job = spool.wait_state(&q, &px, "uploaded").await;
    let took = killed.elapsed();
    assert_eq!(job.held_by, None, "nobody holds a job once it is uploaded");
    eprintln!("kill -9 to the taken-over job uploaded: {took:?} (lease 3s)");
    assert_eq!(
        job.interaction_id, held.interaction_id,
        "uploaded on the interaction the first daemon declared"
    );
    spool.assert_stored_once("x.wav", &x);
    assert_eq!(spool.fake.counters().declares, 1, "declared once");
    let events: Vec<String> = q
        .events(job.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.1)
        .collect();
    assert_eq!(events, ["queued", "declared", "taken-over", "uploaded"]);
    assert!(
        job.last_error.is_none(),
        "the upload's success clears the takeover's note"
    );
    second.stop().await;
}

/// Which member holds `role` now, by name of its run (`daemons.id`), as `status` shows it.
async fn holders(q: &Queue, role: &str) -> Vec<String> {
    let members = q.cluster().unwrap().members(DEADLINE).await.unwrap();
    members
        .into_iter()
        .filter(|m| m.roles.iter().any(|r| r == role))
        .map(|m| m.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_daemon_rescans_for_the_cluster_and_hands_the_role_over_when_it_stops() {
    let spool = Spool::new().await;
    let q = spool.queue().await;
    let every = "[watch]\nrescan_interval = \"1s\"\n";
    let mut a = spool.start(every).await;
    let a_id = a.handle.queue.cluster().unwrap().instance().to_string();
    eventually("the first daemon to take the rescan role", || async {
        holders(&q, "rescan").await == [a_id.clone()]
    })
    .await;
    let mut b = spool.start(every).await;
    let b_id = b.handle.queue.cluster().unwrap().instance().to_string();
    // Every daemon makes its own first scan (it reports ready before it); from then on only the
    // holder reads the folders on schedule.
    eventually("the second daemon's first scan", || async {
        b.handle.metrics.watcher_rescans() >= 1
    })
    .await;
    let b_before = b.handle.metrics.watcher_rescans();
    let a_before = a.handle.metrics.watcher_rescans();
    eventually("the holder to rescan three more times", || async {
        a.handle.metrics.watcher_rescans() >= a_before + 3
    })
    .await;
    assert_eq!(
        b.handle.metrics.watcher_rescans(),
        b_before,
        "the daemon without the role did not rescan"
    );
    assert_eq!(holders(&q, "rescan").await, [a_id], "one holder");
    assert_eq!(holders(&q, "prune").await.len(), 1, "one daemon prunes");
    assert!(a.handle.queue.holds(callferry::queue::Role::Rescan));
    assert!(!b.handle.queue.holds(callferry::queue::Role::Rescan));

    // A graceful stop hands the role over at B's next beat (a third of the 3 s lease), not
    // after the lease.
    a.stop().await;
    eventually("the second daemon to take the rescan role", || async {
        holders(&q, "rescan").await == [b_id.clone()]
    })
    .await;
    let b_now = b.handle.metrics.watcher_rescans();
    eventually("the new holder to rescan", || async {
        b.handle.metrics.watcher_rescans() > b_now
    })
    .await;
    // Its rescans still find what its own events would (a file dropped now is uploaded).
    let x = wav(0.2);
    let px = spool.drop_file("after-handover.wav", &x);
    spool.wait_state(&q, &px, "uploaded").await;
    spool.assert_stored_once("after-handover.wav", &x);
    b.stop().await;
    assert!(holders(&q, "rescan").await.is_empty(), "released on stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_daemon_follows_results_for_the_cluster_and_each_result_is_fetched_once() {
    const N: usize = 6;
    let spool = Spool::with(FakeOptions {
        token: TOKEN.into(),
        processing_time: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let out = spool.dir.path().join("results");
    let results = format!(
        "[results]\nenabled = true\noutput_dir = \"{}\"\npoll_interval = \"200ms\"\n",
        out.display()
    );
    let q = spool.queue().await;
    let a = spool.start(&results).await;
    let b = spool.start(&results).await;
    let files: Vec<(String, Vec<u8>)> = (0..N)
        .map(|i| (format!("call-{i}.wav"), wav(0.2 + i as f64 * 0.01)))
        .collect();
    for (name, bytes) in &files {
        spool.drop_file(name, bytes);
    }
    eventually("every recording processed", || async {
        q.counts().await.unwrap().processed == N as u64
    })
    .await;
    for (name, bytes) in &files {
        spool.assert_stored_once(name, bytes);
        let t = out.join(format!("{name}.transcript.json"));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&t).unwrap()).unwrap();
        assert!(v.get("allParticipants").is_some(), "{}", t.display());
    }
    // Each result file written was fetched once, by one daemon: the role's holder.
    let written = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            let n = n.to_string_lossy();
            n.starts_with("call-") && n.ends_with(".json")
        })
        .count() as u64;
    assert_eq!(spool.fake.counters().result_fetches, written);
    let fetched = |n: &Node| n.handle.metrics.results_fetched("transcript");
    let (fa, fb) = (fetched(&a), fetched(&b));
    assert!(
        (fa, fb) == (N as u64, 0) || (fa, fb) == (0, N as u64),
        "one daemon followed every job: {fa} and {fb}"
    );
    let holder = holders(&q, "results").await;
    assert_eq!(
        holder.len(),
        1,
        "one holder of the results role: {holder:?}"
    );

    // The follower stops: the other daemon takes the role and follows what is uploaded next.
    let (mut stays, mut goes) = if fa > 0 { (b, a) } else { (a, b) };
    goes.stop().await;
    let c = wav(0.3);
    let pc = spool.drop_file("after.wav", &c);
    spool.wait_state(&q, &pc, "processed").await;
    assert!(out.join("after.wav.transcript.json").exists());
    assert_eq!(fetched(&stays), 1 + if fa > 0 { 0 } else { N as u64 });
    stays.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_daemons_stop_does_not_clear_anothers_pause_in_status() {
    let url = server().fresh_db().unwrap();
    let lease = Duration::from_secs(30);
    let a = Queue::connect_pg(&url, "host-a", "host-a", lease)
        .await
        .unwrap();
    let b = Queue::connect_pg(&url, "host-b", "host-b", lease)
        .await
        .unwrap();
    let status = Queue::attach_pg(&url, lease).await.unwrap();
    a.set_daemon_state("pause", Some("the token was rejected (401)"), 10)
        .await
        .unwrap();
    // B recovers, then stops: each clears its own record, as a daemon does at start and stop.
    b.set_daemon_state("pause", None, 11).await.unwrap();
    b.leave().await.unwrap();
    assert_eq!(
        status.daemon_state("pause").await.unwrap().map(|v| v.0),
        Some("the token was rejected (401)".to_string()),
        "A is still paused"
    );
    // A stops: a stopped daemon's pause says nothing about now.
    a.leave().await.unwrap();
    assert_eq!(status.daemon_state("pause").await.unwrap(), None);
    // A's next run on the same host starts with a clean record.
    let a2 = Queue::connect_pg(&url, "host-a", "host-a", lease)
        .await
        .unwrap();
    assert_eq!(a2.daemon_state("pause").await.unwrap(), None);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM daemon_state")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "the earlier run's record was removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_works_on_the_shared_queue_and_the_recording_is_never_queued_again() {
    let spool = Spool::new().await;
    let cfg = spool.config_file("callferry.toml", "");
    let q = spool.queue().await;
    let mut node = spool.start("").await;
    let a = wav(0.4);
    let pa = spool.drop_file("forget-me.wav", &a);
    let job = spool.wait_state(&q, &pa, "uploaded").await;
    let iid = job.interaction_id.clone().unwrap();
    let keep = wav(0.5);
    let pk = spool.drop_file("keep-me.wav", &keep);
    spool.wait_state(&q, &pk, "uploaded").await;

    // Forgotten while the daemon runs: the job, its events and the interaction go.
    let (code, out, err) = spool
        .command_err(&cfg, &["forget", &job.id.to_string()])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("forgot 1 call"), "{out}");
    assert_eq!(spool.fake.deleted(), [iid], "deleted at the service");
    assert!(q.get(job.id).await.unwrap().is_none(), "the job is gone");
    assert!(q.events(job.id).await.unwrap().is_empty(), "its events too");
    assert_eq!(q.counts().await.unwrap().total(), 1, "the other call stays");
    let pool = sqlx::PgPool::connect(&spool.url).await.unwrap();
    let tombstones: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM forgets")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(tombstones, 0, "the forget finished");

    // The audio is still on disk: neither a rescan's queueing nor `enqueue` brings it back.
    let (code, out, err) = spool
        .command_err(&cfg, &["enqueue", pa.to_str().unwrap()])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("queued   #"), "{out}");
    node.stop().await;
    let mut again = spool.start("").await;
    let b = wav(0.3);
    let pb = spool.drop_file("after.wav", &b);
    spool.wait_state(&q, &pb, "uploaded").await;
    assert_eq!(
        q.counts().await.unwrap().total(),
        2,
        "forget-me.wav not queued again"
    );
    assert_eq!(spool.fake.counters().declares, 3, "nor declared again");
    again.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recorders_hook_reaches_the_shared_queue_from_any_hosts_daemon() {
    let spool = Spool::new().await;
    let q = spool.queue().await;
    // Each host's daemon has its own drop folder; the watcher waits 10 minutes for a sidecar, so
    // what goes out now came through the hook.
    let drop_folder = |name: &str| {
        use std::os::unix::fs::PermissionsExt;
        let d = spool.dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        // As the package makes it: the recorders' group may create requests, not list them.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o3730)).unwrap();
        d
    };
    let (hook_a, hook_b) = (drop_folder("hook-a"), drop_folder("hook-b"));
    let extra = |dir: &Path| {
        format!(
            "[watch]\nhook_dir = \"{}\"\nsidecar_wait = \"10m\"\n",
            dir.display()
        )
    };
    let mut a = spool.start(&extra(&hook_a)).await;
    let mut b = spool.start(&extra(&hook_b)).await;
    let bytes = wav(0.3);
    let p = spool.drop_file("hooked.wav", &bytes);
    let queued = poll_for("a watcher queued it", || async {
        q.list(None, 10)
            .await
            .unwrap()
            .into_iter()
            .find(|j| j.path == p.to_string_lossy())
    })
    .await;
    // The recorder on host B says which call it was.
    let out = callferry()
        .args(["enqueue", "--now", "--hook-dir"])
        .arg(&hook_b)
        .args(["--external-id", "pbx-42", "--meta", "agent=7"])
        .arg(&p)
        .env_remove("CALLFERRY_CONFIG")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let job = spool.wait_state(&q, &p, "uploaded").await;
    assert_eq!(job.id, queued.id, "the hook attached to the watcher's job");
    assert_eq!(job.external_id.as_deref(), Some("pbx-42"));
    let declares: Vec<serde_json::Value> = spool
        .fake
        .interactions()
        .into_iter()
        .map(|i| i.declare_body)
        .collect();
    assert_eq!(declares.len(), 1, "declared once: {declares:?}");
    assert_eq!(declares[0]["externalIdentifier"], "pbx-42");
    spool.assert_stored_once("hooked.wav", &bytes);
    assert!(
        std::fs::read_dir(&hook_b).unwrap().next().is_none(),
        "the request was taken and removed"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_database_outage_longer_than_the_lease_loses_nothing_and_uploads_nothing_twice() {
    let logs = crate::helpers::Logs::default();
    let _guard = logs.install();
    // A server of its own: this test stops it, as a crash or a cut network would. With
    // PostgreSQL's own durability settings (the shared test server turns them off), since a
    // committed transaction must survive the crash, as it does in production.
    let pg = PgCluster::start_with(&[]).unwrap_or_else(|e| panic!("PostgreSQL test server: {e}"));
    let url = pg.create_db("outage").unwrap();
    let spool = Spool::on(
        url,
        FakeOptions {
            token: TOKEN.into(),
            // Slow enough that uploads are in flight when the database goes.
            latency: Duration::from_millis(150),
            ..Default::default()
        },
    )
    .await;
    let mut node = spool.start("").await;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..8 {
        let (name, bytes) = (format!("before-{i}.wav"), wav(0.2 + i as f64 * 0.01));
        spool.drop_file(&name, &bytes);
        files.push((name, bytes));
    }
    eventually("some uploads under way", || async {
        spool.fake.counters().declares >= 2
    })
    .await;
    pg.pause().unwrap();
    // Recordings keep arriving while the queue is gone, for longer than the 3 s lease.
    for i in 0..4 {
        let (name, bytes) = (format!("during-{i}.wav"), wav(0.3 + i as f64 * 0.01));
        spool.drop_file(&name, &bytes);
        files.push((name, bytes));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !node.task.as_ref().unwrap().is_finished(),
        "the daemon outlives its database's outage"
    );
    pg.resume().unwrap();
    let q = spool.queue().await;
    let deadline = Instant::now() + DEADLINE;
    while q.counts().await.unwrap().uploaded < files.len() as u64 {
        if Instant::now() > deadline {
            let jobs: Vec<String> = q
                .list(None, 100)
                .await
                .unwrap()
                .iter()
                .map(|j| format!("{} {:?} {:?}", j.path, j.state, j.last_error))
                .collect();
            let counts = q.counts().await;
            panic!(
                "not every recording uploaded after the outage: {counts:?} {jobs:#?}\n{}",
                logs.lines().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (name, bytes) in &files {
        spool.assert_stored_once(name, bytes);
    }
    let counts = q.counts().await.unwrap();
    assert_eq!(counts.total(), files.len() as u64, "{counts:?}");
    // A declare whose id could not be committed before the lease ran out may be declared again:
    // each such extra interaction is counted as an orphan, none goes unaccounted.
    let interactions = spool.fake.interactions().len() as u64;
    let orphans = q.orphan_declares().await.unwrap();
    assert!(
        interactions <= files.len() as u64 + orphans,
        "{interactions} interactions for {} recordings, {orphans} orphans counted",
        files.len()
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_frozen_past_its_lease_wakes_to_find_its_job_taken_over_and_commits_nothing() {
    let spool = Spool::new().await;
    let q = spool.queue().await;
    let cfg = spool.config_file("frozen.toml", "[api]\nstall_timeout = \"60s\"\n");
    let log = spool.dir.path().join("frozen.log");
    let _show = ShowLogOnPanic(log.clone());
    // The frozen daemon's upload is held at the fake, so it is mid-upload when it freezes.
    spool
        .fake
        .push_fault(Endpoint::Upload, Fault::Stall(Duration::from_secs(8)));
    let mut frozen = Daemon::spawn(&cfg, &log, &[]);
    let x = wav(0.5);
    let px = spool.drop_file("x.wav", &x);
    eventually("the upload to reach the fake", || async {
        spool.fake.counters().faults_injected == 1
    })
    .await;
    let held = spool.wait_state(&q, &px, "uploading").await;
    frozen.signal(libc::SIGSTOP);

    // Another daemon takes the job over once the frozen one's lease runs out, and finishes it
    // on the same interaction.
    let mut other = spool.start("").await;
    let job = spool.wait_state(&q, &px, "uploaded").await;
    assert_eq!(job.interaction_id, held.interaction_id);

    // The frozen daemon wakes up: its held upload gets its answer, and whatever it is, its
    // outcome is refused by the fence and the job is dropped there.
    frozen.signal(libc::SIGCONT);
    frozen.wait_log("job dropped here").await;
    assert!(frozen.exited().is_none(), "it keeps running");
    spool.assert_stored_once("x.wav", &x);
    assert_eq!(spool.fake.counters().declares, 1, "declared once");
    let after = q.get(job.id).await.unwrap().unwrap();
    assert_eq!(after.state, job.state, "the late daemon changed nothing");
    assert_eq!(after.upload_status, job.upload_status);

    // Both go on working: a recording dropped now is stored once.
    let y = wav(0.3);
    let py = spool.drop_file("y.wav", &y);
    spool.wait_state(&q, &py, "uploaded").await;
    spool.assert_stored_once("y.wav", &y);
    frozen.signal(libc::SIGTERM);
    frozen.wait(Duration::from_secs(30)).await;
    other.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_queued_by_one_daemon_is_shared_by_the_others_at_once() {
    const N: usize = 40;
    let spool = Spool::with(FakeOptions {
        token: TOKEN.into(),
        latency: Duration::from_millis(60),
        ..Default::default()
    })
    .await;
    // The default lease (30 s): without a wake-up across daemons, the second would learn of
    // the first's jobs only at its reaper's next look, seconds after this burst is done.
    let lease = "[queue]\nlease = \"30s\"\n";
    let q = spool.queue().await;
    let a = spool.start(lease).await;
    let b = spool.start(lease).await;
    for i in 0..N {
        spool.drop_file(&format!("burst-{i:02}.wav"), &wav(0.2 + i as f64 * 0.001));
    }
    eventually("the burst uploaded", || async {
        q.counts().await.unwrap().uploaded == N as u64
    })
    .await;
    let done = |n: &Node| n.handle.metrics.uploads_with_outcome("created", "default");
    let (na, nb) = (done(&a), done(&b));
    assert_eq!(na + nb, N as u64, "each stored once");
    assert!(na > 0 && nb > 0, "both daemons took part: {na} and {nb}");
    assert_eq!(spool.fake.counters().declares, N as u64);
    let (mut a, mut b) = (a, b);
    a.stop().await;
    b.stop().await;
}
