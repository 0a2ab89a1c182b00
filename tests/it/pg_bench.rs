//! The PostgreSQL queue's benchmark, the API 20 ms away (the fake's latency):
//!
//! - **Files per second** for 1, 2 and 3 daemons, each a separate `callferry run` process, on one
//!   shared folder and one database, next to one daemon on SQLite under the same load as the
//!   reference. The daemons are started on an empty folder and READY before 600 recordings of
//!   1 MiB (written beforehand, an hour old, so complete at once) are renamed into it in one
//!   burst; the rate is the fake's own, first declare to last stored upload. Each daemon's share
//!   comes from its `uploaded` log lines. With the default lease (30 s) and the shortest (3 s):
//!   an idle daemon learns of jobs another daemon queued only at its reaper's tick.
//! - **Takeover**: three daemons on a backlog of slow uploads; one that holds claims is `kill -9`ed
//!   (and not restarted: a lost host), and the time is taken from the kill until its claims are put
//!   back (the survivors' reaper) and until the first upload of one of its jobs reaches the fake
//!   (answered 201, or 409 when the dead daemon's upload had got through), for leases of 3 s, 10 s
//!   and the default 30 s.
//!
//! PostgreSQL runs with its defaults (fsync on, synchronous commit), not the tests' tuning. Every
//! process shares one machine's cores, so this shows the queue's cost and how the work spreads,
//! not what separate hosts would gain; the figures are in bench/README.md.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use callferry::pgcluster::PgCluster;
use callferry::queue::Queue;
use callferry_fake::{FakeApi, FakeOptions};

use crate::hardening::proc::{Daemon, ShowLogOnPanic, queue_when_ready};
use crate::helpers::{TOKEN, config_text, wav};
use crate::pg_soak::{claims_of, instance_of};

const LATENCY: Duration = Duration::from_millis(20);
const WORKERS: usize = 4;
/// Recordings per throughput round, 1 MiB each (the size callferry-bench's 1(ii) uses).
const FILES: usize = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark, about 4 minutes, best on a quiet machine: cargo test --release --test it \
            pg_bench -- --ignored --nocapture"]
async fn pg_bench_files_per_second_and_takeover() {
    println!("pg bench: load average before {}", load_average());
    let server = PgCluster::start_with(&[])
        .unwrap_or_else(|e| panic!("PostgreSQL server for the bench: {e}"));
    let mut n_db = 0;
    let mut fresh_db = || {
        n_db += 1;
        server
            .create_db(&format!("bench{}_{n_db}", std::process::id()))
            .unwrap()
    };

    let limit = |daemons: usize| (daemons * WORKERS) as f64 / (2.0 * LATENCY.as_secs_f64());
    let sqlite = throughput(None, 1, 30).await;
    sqlite.print("SQLite", 1, limit(1));
    // The default lease, then the shortest: an idle daemon's workers learn of jobs that another
    // daemon queued only at its reaper's look (every half lease, at most 5 s), so the lease
    // decides how soon a burst spreads over the daemons.
    for (lease_s, counts) in [(30, 1..=3), (3, 2..=3)] {
        for daemons in counts {
            let r = throughput(Some(fresh_db()), daemons, lease_s).await;
            r.print(
                &format!("PostgreSQL (lease {lease_s} s)"),
                daemons,
                limit(daemons),
            );
        }
    }
    println!(
        "pg bench: load average after the throughput rounds {}",
        load_average()
    );

    for (lease_s, runs) in [(3, 3), (10, 3), (30, 1)] {
        for run in 0..runs {
            let t = takeover(&fresh_db(), lease_s, run).await;
            println!(
                "pg bench: takeover, lease {lease_s} s: kill -9 of a daemon holding {} claims → \
                 claims put back after {:.2} s, first upload of one of its jobs after {:.2} s",
                t.held,
                t.put_back.as_secs_f64(),
                t.first_upload.as_secs_f64()
            );
        }
    }
    println!("pg bench: load average after {}", load_average());
}

struct Throughput {
    files_per_s: f64,
    /// From the burst until the queue counted every file uploaded.
    wall: Duration,
    /// Files each daemon uploaded (its `uploaded` log lines).
    per_daemon: Vec<usize>,
    /// The daemons' CPU (user + system) per file, from /proc.
    cpu_ms_per_file: f64,
    /// The most connections to the database seen at once (the daemons' and the watching
    /// queue's, which uses one), sampled every 20 ms.
    connections: Option<usize>,
    /// The queue's tables and indexes, per job.
    bytes_per_job: Option<usize>,
}

impl Throughput {
    fn print(&self, queue: &str, daemons: usize, limit: f64) {
        println!(
            "pg bench: {queue}, {daemons} daemon(s) x {WORKERS} workers, {FILES} x 1 MiB, API \
             latency {LATENCY:?}: {:.1} files/s = {:.0} % of the latency limit {limit:.0} \
             files/s (first declare to last stored; {:.2} s burst to all counted uploaded); \
             files per daemon {:?}; daemon CPU {:.2} ms per file{}",
            self.files_per_s,
            100.0 * self.files_per_s / limit,
            self.wall.as_secs_f64(),
            self.per_daemon,
            self.cpu_ms_per_file,
            match self.connections {
                Some(n) => format!(
                    "; at most {n} connections to the database; {} bytes per job in it",
                    self.bytes_per_job.unwrap_or(0)
                ),
                None => String::new(),
            }
        );
    }
}

/// A folder, the fake and the daemons' config: PostgreSQL at `url`, or SQLite in the folder.
struct Spool {
    dir: tempfile::TempDir,
    rec: PathBuf,
    fake: FakeApi,
    cfg: PathBuf,
    logs: Vec<PathBuf>,
}

impl Spool {
    async fn new(url: Option<&str>, daemons: usize, extra: &str) -> Spool {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("rec");
        std::fs::create_dir_all(&rec).unwrap();
        std::fs::create_dir_all(dir.path().join("incoming")).unwrap();
        let fake = FakeApi::start(FakeOptions {
            token: TOKEN.into(),
            latency: LATENCY,
            ..Default::default()
        })
        .await
        .unwrap();
        let queue = match url {
            Some(url) => format!("[queue]\ndatabase = \"{url}\"\n"),
            None => String::new(),
        };
        let cfg = dir.path().join("callferry.toml");
        let text =
            format!("{queue}[upload]\nworkers = {WORKERS}\n[log]\nlevel = \"info\"\n{extra}");
        std::fs::write(&cfg, config_text(&fake.base_url(), dir.path(), &text)).unwrap();
        let logs = (0..daemons)
            .map(|i| dir.path().join(format!("daemon{i}.log")))
            .collect();
        Spool {
            dir,
            rec,
            fake,
            cfg,
            logs,
        }
    }

    /// Writes `n` recordings of `bytes` (each made distinct) outside the watched folder, an hour
    /// old, so that renaming them in makes each complete at once: (name, path outside).
    fn prepare(&self, n: usize, bytes: &[u8]) -> Vec<(String, PathBuf)> {
        let old = SystemTime::now() - Duration::from_secs(3600);
        (0..n)
            .map(|i| {
                let name = format!("call-{i:04}.wav");
                let p = self.dir.path().join("incoming").join(&name);
                let mut b = bytes.to_vec();
                b[44..52].copy_from_slice(&(i as u64).to_le_bytes());
                std::fs::write(&p, &b).unwrap();
                std::fs::File::options()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_modified(old)
                    .unwrap();
                (name, p)
            })
            .collect()
    }

    fn drop_in(&self, files: &[(String, PathBuf)]) {
        for (name, p) in files {
            std::fs::rename(p, self.rec.join(name)).unwrap();
        }
    }

    /// Starts one daemon per log and waits until each is READY.
    async fn start(&self) -> Vec<Daemon> {
        let mut daemons: Vec<Daemon> = self
            .logs
            .iter()
            .map(|l| Daemon::spawn(&self.cfg, l, &[]))
            .collect();
        for d in daemons.iter_mut() {
            d.wait_log("callferry running").await;
        }
        daemons
    }

    /// Per name, the uploads the fake answered (201 or 409).
    fn answered_uploads(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for i in self.fake.interactions() {
            for u in &i.uploads {
                if u.answered == 201 || u.answered == 409 {
                    *m.entry(u.field_name.clone()).or_default() += 1;
                }
            }
        }
        m
    }

    /// Every recording stored exactly once, whole, and no declare beyond one per recording.
    fn check_stored_once(&self, files: usize, kills: bool) {
        let interactions = self.fake.interactions();
        let mut stored: HashMap<&str, usize> = HashMap::new();
        for i in &interactions {
            for u in i.uploads.iter().filter(|u| u.stored) {
                assert_eq!(
                    u.size,
                    std::fs::metadata(self.rec.join(&u.field_name))
                        .unwrap()
                        .len()
                );
                *stored.entry(u.field_name.as_str()).or_default() += 1;
            }
        }
        assert_eq!(stored.len(), files, "every recording stored");
        assert!(stored.values().all(|&n| n == 1), "each stored once");
        if !kills {
            assert_eq!(interactions.len(), files, "each declared once");
        }
    }
}

async fn open_queue(url: Option<&str>, spool: &Spool) -> Queue {
    match url {
        Some(url) => Queue::attach_pg(url, Duration::from_secs(30))
            .await
            .unwrap(),
        None => queue_when_ready(&spool.dir.path().join("state/queue.db")).await,
    }
}

async fn throughput(url: Option<String>, daemons: usize, lease_s: u64) -> Throughput {
    let url = url.as_deref();
    let lease = match url {
        Some(_) => format!("[queue]\nlease = \"{lease_s}s\"\n"),
        None => String::new(),
    };
    let spool = Spool::new(url, daemons, &lease).await;
    let _show: Vec<ShowLogOnPanic> = spool.logs.iter().cloned().map(ShowLogOnPanic).collect();
    // 65 s of 8 kHz 16-bit mono: 1,040,044 bytes.
    let files = spool.prepare(FILES, &wav(65.0));
    let mut running = spool.start().await;
    let q = open_queue(url, &spool).await;
    // One connection of its own, not counted, to watch how many the daemons open.
    let admin = match url {
        Some(url) => Some(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(url)
                .await
                .unwrap(),
        ),
        None => None,
    };
    let mut connections = None;
    let burst = Instant::now();
    spool.drop_in(&files);
    loop {
        if let Some(admin) = &admin {
            let n: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .fetch_one(admin)
            .await
            .unwrap();
            connections = connections.max(Some(n as usize));
        }
        let c = q.counts().await.unwrap();
        if c.uploaded as usize >= FILES {
            break;
        }
        assert!(
            burst.elapsed() < Duration::from_secs(300),
            "not done: {c:?}"
        );
        for d in running.iter_mut() {
            assert!(d.exited().is_none(), "a daemon exited:\n{}", d.log_text());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = burst.elapsed();
    let cpu: Duration = running.iter().map(|d| cpu_time(d.pid())).sum();
    stop(&mut running).await;
    q.close().await;
    let mut bytes_per_job = None;
    if let Some(admin) = admin {
        // What the queue keeps per recording (pruning is not run on PostgreSQL yet): the tables
        // with their indexes and TOAST.
        let n: i64 = sqlx::query_scalar(
            "SELECT (SUM(pg_total_relation_size(c.oid)))::BIGINT FROM pg_class c \
             WHERE c.relname IN ('jobs', 'job_events', 'known_versions') AND c.relkind = 'r'",
        )
        .fetch_one(&admin)
        .await
        .unwrap();
        bytes_per_job = Some(n as usize / FILES);
        admin.close().await;
    }
    spool.check_stored_once(FILES, false);
    let interactions = spool.fake.interactions();
    let first = interactions.iter().map(|i| i.declared_at_ms).min().unwrap();
    let last = interactions
        .iter()
        .filter_map(|i| i.stored_at_ms)
        .max()
        .unwrap();
    let per_daemon = spool
        .logs
        .iter()
        .map(|l| {
            std::fs::read_to_string(l)
                .unwrap()
                .lines()
                .filter(|l| l.contains(" uploaded") && l.contains("bytes="))
                .count()
        })
        .collect();
    Throughput {
        files_per_s: FILES as f64 / ((last - first).max(1) as f64 / 1000.0),
        wall,
        per_daemon,
        cpu_ms_per_file: cpu.as_secs_f64() * 1000.0 / FILES as f64,
        connections,
        bytes_per_job,
    }
}

struct Takeover {
    held: usize,
    put_back: Duration,
    first_upload: Duration,
}

async fn takeover(url: &str, lease_s: u64, run: usize) -> Takeover {
    const FILES: usize = 240;
    let spool = Spool::new(Some(url), 3, &format!("[queue]\nlease = \"{lease_s}s\"\n")).await;
    let _show: Vec<ShowLogOnPanic> = spool.logs.iter().cloned().map(ShowLogOnPanic).collect();
    // 4 s of audio (64 KiB) at 128 KiB/s: each upload takes half a second, so every daemon holds
    // claims nearly all the time, mostly mid-upload, as with long recordings on a busy uplink.
    spool.fake.set_upload_rate(Some(128 * 1024));
    let files = spool.prepare(FILES, &wav(4.0));
    let mut running = spool.start().await;
    let admin = sqlx::PgPool::connect(url).await.unwrap();
    spool.drop_in(&files);
    // Working for a second first: past the start's burst of discovery, into steady uploads.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let victim = run % running.len();
    let pid = running[victim].pid();
    let me = crate::helpers::poll_for("the victim's registration", || async {
        instance_of(&admin, pid).await
    })
    .await;
    crate::helpers::poll_for("the victim to hold claims", || async {
        (claims_of(&admin, &me).await > 0).then_some(())
    })
    .await;
    let killed = Instant::now();
    running[victim].kill9().await;
    let dead = running.remove(victim);
    // Its claims stand until their lease runs out: what it held at the kill.
    let held: Vec<String> = sqlx::query_scalar(
        "SELECT path FROM jobs WHERE holder = $1 AND state IN ('declaring', 'uploading')",
    )
    .bind(&me)
    .fetch_all(&admin)
    .await
    .unwrap();
    let names: Vec<String> = held
        .iter()
        .map(|p| {
            Path::new(p)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert!(!names.is_empty());
    let before = spool.answered_uploads();
    let (mut put_back, mut first_upload) = (None, None);
    while put_back.is_none() || first_upload.is_none() {
        assert!(
            killed.elapsed() < Duration::from_secs(2 * lease_s + 30),
            "no takeover after {:?}",
            killed.elapsed()
        );
        if put_back.is_none() && claims_of(&admin, &me).await == 0 {
            put_back = Some(killed.elapsed());
        }
        if first_upload.is_none() {
            let now = spool.answered_uploads();
            let n = |m: &HashMap<String, usize>, k: &str| m.get(k).copied().unwrap_or(0);
            if names.iter().any(|k| n(&now, k) > n(&before, k)) {
                first_upload = Some(killed.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let q = open_queue(Some(url), &spool).await;
    while q.counts().await.unwrap().uploaded < FILES as u64 {
        assert!(killed.elapsed() < Duration::from_secs(300), "not drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(&mut running).await;
    drop(dead);
    q.close().await;
    admin.close().await;
    spool.check_stored_once(FILES, true);
    Takeover {
        held: names.len(),
        put_back: put_back.unwrap(),
        first_upload: first_upload.unwrap(),
    }
}

async fn stop(daemons: &mut [Daemon]) {
    for d in daemons.iter() {
        d.signal(libc::SIGTERM);
    }
    for d in daemons.iter_mut() {
        let st = d.wait(Duration::from_secs(30)).await;
        assert_eq!(st.code(), Some(0), "SIGTERM → exit 0:\n{}", d.log_text());
    }
}

/// User + system CPU of a live process, from /proc/<pid>/stat.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command's closing parenthesis: state is field 0, utime 11, stime 12.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split(' ')
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
