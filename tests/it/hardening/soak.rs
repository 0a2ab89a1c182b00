//! The crash soak: recordings arrive while the real daemon (`callferry run`, a child
//! process) is `kill -9`ed at random moments and restarted, against the project's fake with random
//! faults on (5xx, 429, resets before and after the audio is stored). The verdict comes from the
//! fake's own records, not from the daemon's opinion of itself:
//!
//! - every file's bytes were stored, intact (size and SHA-256), under its own name: nothing lost;
//! - no file version was stored on two interactions (no double declare that mattered);
//! - every interaction that saw an upload is the one the queue committed for that version;
//! - declares whose interaction never saw an upload (a kill between the service creating the
//!   interaction and our commit of its id: the one documented window) are counted, not hidden;
//! - nothing is stuck: every job ends `uploaded`, every file is moved to `move_to`, and the last
//!   daemon stops on SIGTERM with exit 0.
//!
//! Short version in CI; the full one (1,000 files × 20 kills) is ignored by default:
//! `cargo test --release -- --ignored soak --nocapture`.
//! `CALLFERRY_SOAK_SEED`, `CALLFERRY_SOAK_FILES` and `CALLFERRY_SOAK_KILLS` override the plan.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use callferry::queue::State;
use callferry_fake::{FakeApi, FakeOptions, RandomFaults};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::proc::{Daemon, queue_when_ready, write_config};
use crate::helpers::*;

struct Plan {
    files: usize,
    kills: usize,
    /// A kill lands this long after the (re)start, uniformly; every fourth (the first one
    /// included, which catches the database being created) lands within 80 ms instead, while the
    /// daemon is still opening the database and recovering.
    kill_after_ms: (u64, u64),
    /// Files are written over about this long (the kill phase lasts about as long).
    write_over: Duration,
    /// How long the last run may take to drain the queue.
    drain_limit: Duration,
}

struct Written {
    rel: String,
    sha: String,
    len: u64,
}

#[derive(Debug, Default)]
struct Figures {
    seed: u64,
    files: usize,
    kills: usize,
    kills_early: usize,
    recovered_declaring: u64,
    recovered_uploading: u64,
    declare_requests: u64,
    interactions: usize,
    upload_requests: usize,
    uploads_stored: u64,
    uploads_409: u64,
    faults_injected: u64,
    lost: usize,
    double_declares: usize,
    orphan_declares: usize,
    seconds: f64,
}

impl Figures {
    fn summary(&self) -> String {
        format!(
            "soak (seed {}): {} files, {} kills ({} during start-up); {} declare requests, {} interactions, \
             {} upload requests, {} stored, {} answered 409; lost {}, double declares {}, orphan declares {}; \
             {:.1} s",
            self.seed,
            self.files,
            self.kills,
            self.kills_early,
            self.declare_requests,
            self.interactions,
            self.upload_requests,
            self.uploads_stored,
            self.uploads_409,
            self.lost,
            self.double_declares,
            self.orphan_declares,
            self.seconds
        )
    }
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_short_kill9_during_uploads_loses_nothing() {
    let f = soak(Plan {
        files: env_or("CALLFERRY_SOAK_FILES", 80),
        kills: env_or("CALLFERRY_SOAK_KILLS", 5),
        kill_after_ms: (150, 1200),
        write_over: Duration::from_secs(3),
        drain_limit: Duration::from_secs(60),
    })
    .await;
    println!("{}\n{f:#?}", f.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "about a minute in release mode: cargo test --release -- --ignored soak --nocapture"]
async fn soak_full_1000_files_20_kills() {
    let f = soak(Plan {
        files: env_or("CALLFERRY_SOAK_FILES", 1000),
        kills: env_or("CALLFERRY_SOAK_KILLS", 20),
        kill_after_ms: (150, 2500),
        write_over: Duration::from_secs(25),
        drain_limit: Duration::from_secs(300),
    })
    .await;
    println!("{}\n{f:#?}", f.summary());
}

/// Writes `n` recordings into `rec`, spread over `spread`: most delivered by rename (as rsync and
/// recorders that finish into place do), some written in place in a few chunks (as a live call).
/// Every file's content is unique.
fn write_files(rec: &Path, n: usize, seed: u64, spread: Duration) -> Vec<Written> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let pause = spread / n.max(1) as u32;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let rel = format!("d{}/call-{i:05}.wav", i % 7);
        let dest = rec.join(&rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        let secs = rng.random_range(0.1..4.0);
        let bytes = callferry_fake::wav_bytes(secs, 200.0 + i as f64);
        if rng.random_bool(0.15) {
            use std::io::Write;
            let mut f = std::fs::File::create(&dest).unwrap();
            for chunk in bytes.chunks(bytes.len() / 3 + 1) {
                f.write_all(chunk).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
        } else {
            let tmp = dest.with_file_name(format!(".call-{i:05}.wav.part"));
            std::fs::write(&tmp, &bytes).unwrap();
            std::fs::rename(&tmp, &dest).unwrap();
        }
        out.push(Written {
            rel,
            sha: sha256(&bytes),
            len: bytes.len() as u64,
        });
        // Pacing of the workload, not synchronisation.
        std::thread::sleep(pause);
    }
    out
}

/// `(declaring, uploading)` summed over the daemon's "recovered jobs" log lines.
fn recovered_counts(log: &str) -> (u64, u64) {
    let field = |line: &str, key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    log.lines()
        .filter(|l| l.contains("recovered jobs"))
        .fold((0, 0), |(d, u), l| {
            (d + field(l, "declaring="), u + field(l, "uploading="))
        })
}

async fn soak(plan: Plan) -> Figures {
    let started = Instant::now();
    let seed: u64 = env_or(
        "CALLFERRY_SOAK_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    println!(
        "soak: seed {seed} (CALLFERRY_SOAK_SEED={seed} to replay the same plan), {} files, {} kills",
        plan.files, plan.kills
    );
    let mut rng = StdRng::seed_from_u64(seed);

    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    let done = dir.path().join("done");
    std::fs::create_dir_all(&rec).unwrap();
    let fake = FakeApi::start(FakeOptions {
        token: TOKEN.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    fake.set_random_faults(RandomFaults {
        seed,
        p_5xx: 0.05,
        p_429: 0.03,
        p_reset_before_store: 0.03,
        p_reset_after_store: 0.05,
    });
    // Uploads take a little while, so kills land mid-transfer too.
    fake.set_upload_rate(Some(2_000_000));
    let cfg = write_config(
        dir.path(),
        &fake.base_url(),
        &format!(
            r#"
[watch]
settle = "1s"
[upload]
workers = 4
max_attempts = 1000
max_declares = 1000  # random resets and 5xx on declares count as lost answers; here no job may fail
backoff_initial = "20ms"
backoff_max = "300ms"
[after_upload]
action = "move"
move_to = "{}"
[log]
level = "info"
"#,
            done.display()
        ),
    );
    let log = dir.path().join("daemon.log");

    let writer = {
        let rec = rec.clone();
        let (n, spread) = (plan.files, plan.write_over);
        tokio::task::spawn_blocking(move || write_files(&rec, n, seed, spread))
    };

    let mut f = Figures {
        seed,
        files: plan.files,
        kills: plan.kills,
        ..Default::default()
    };
    for k in 0..plan.kills {
        let mut d = Daemon::spawn(&cfg, &log, &[]);
        let after = if k % 4 == 0 {
            f.kills_early += 1;
            rng.random_range(0..80)
        } else {
            rng.random_range(plan.kill_after_ms.0..plan.kill_after_ms.1)
        };
        tokio::time::sleep(Duration::from_millis(after)).await;
        d.kill9().await;
        assert!(!d.wait(DEADLINE).await.success());
    }

    // The last run drains everything, then stops the way systemd stops it.
    let mut d = Daemon::spawn(&cfg, &log, &[]);
    let written = writer.await.unwrap();
    let q = queue_when_ready(&dir.path().join("state/queue.db")).await;
    let drain_start = Instant::now();
    loop {
        let c = q.counts().await.unwrap();
        let all_moved = written.iter().all(|w| done.join(&w.rel).exists());
        if c.waiting() == 0 && c.uploaded as usize >= written.len() && all_moved {
            break;
        }
        if let Some(st) = d.exited() {
            panic!("the daemon exited by itself ({st}):\n{}", d.log_text());
        }
        assert!(
            drain_start.elapsed() < plan.drain_limit,
            "not drained after {:?}: {c:?}, {} of {} files moved; stuck jobs: {:#?}\nlog tail:\n{}",
            plan.drain_limit,
            written
                .iter()
                .filter(|w| done.join(&w.rel).exists())
                .count(),
            written.len(),
            q.list(None, 100_000)
                .await
                .unwrap()
                .into_iter()
                .filter(|j| j.state != State::Uploaded)
                .take(10)
                .collect::<Vec<_>>(),
            tail(&d.log_text(), 40),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    d.signal(libc::SIGTERM);
    let st = d.wait(DEADLINE).await;
    assert_eq!(
        st.code(),
        Some(0),
        "SIGTERM → exit 0:\n{}",
        tail(&d.log_text(), 40)
    );
    let log_text = d.log_text();
    (f.recovered_declaring, f.recovered_uploading) = recovered_counts(&log_text);

    // --- The verdict, from the fake's records. ---
    let jobs = q.list(None, 100_000).await.unwrap();
    let counted_orphans = q.orphan_declares().await.unwrap();
    q.close().await;
    let interactions = fake.interactions();
    let counters = fake.counters();
    f.declare_requests = counters.declares;
    f.interactions = interactions.len();
    f.upload_requests = interactions.iter().map(|i| i.uploads.len()).sum();
    f.uploads_stored = counters.uploads_stored;
    f.uploads_409 = counters.uploads_conflict;
    f.faults_injected = counters.faults_injected;

    // Nothing stuck, nothing failed; one job per file (each file is written once).
    let not_done: Vec<_> = jobs.iter().filter(|j| j.state != State::Uploaded).collect();
    assert!(not_done.is_empty(), "jobs not uploaded: {not_done:#?}");
    assert_eq!(jobs.len(), written.len(), "one job per file version");

    let by_id: BTreeMap<i64, &callferry::queue::Job> = jobs.iter().map(|j| (j.id, j)).collect();
    // Names follow no recorder's convention here, so each declare's externalIdentifier is its
    // recording's path below the watched folder: one file, one job.
    let by_rel: BTreeMap<PathBuf, i64> = jobs
        .iter()
        .map(|j| (j.fs_path().strip_prefix(&rec).unwrap().to_path_buf(), j.id))
        .collect();
    let job_of = |ext: &str| by_rel.get(Path::new(ext)).copied();
    let mut per_job: BTreeMap<i64, Vec<&callferry_fake::InteractionRecord>> = BTreeMap::new();
    for i in &interactions {
        let ext = i.declare_body["externalIdentifier"].as_str().unwrap_or("");
        let job = job_of(ext).unwrap_or_else(|| panic!("declare without our identifier: {i:?}"));
        assert!(by_id.contains_key(&job), "declare for an unknown job {ext}");
        per_job.entry(job).or_default().push(i);
    }
    for (job_id, list) in &per_job {
        let job = by_id[job_id];
        let committed = job
            .interaction_id
            .as_deref()
            .expect("uploaded job has an id");
        let stored: Vec<_> = list
            .iter()
            .filter(|i| i.uploads.iter().any(|u| u.stored))
            .collect();
        if stored.len() > 1 {
            f.double_declares += 1;
        }
        for i in list {
            if i.id != committed {
                // Declared, its id never committed (killed in between): never uploaded to.
                assert!(
                    i.uploads.is_empty(),
                    "job {job_id}: an upload went to interaction {} that the queue never committed (it has {committed})",
                    i.id
                );
                f.orphan_declares += 1;
            }
        }
        let on_committed = list.iter().find(|i| i.id == committed);
        let ok = on_committed.is_some_and(|i| {
            let s: Vec<_> = i.uploads.iter().filter(|u| u.stored).collect();
            s.len() == 1 && s[0].size == job.size
        });
        assert!(
            ok,
            "job {job_id} ({}) is not stored exactly once on its committed interaction {committed}: {list:#?}",
            job.path
        );
    }
    assert_eq!(
        f.double_declares, 0,
        "a file version stored on two interactions"
    );

    // Every file's bytes reached the service intact, under its own name, and were then moved.
    let stored_by_name: BTreeMap<String, HashSet<String>> = interactions
        .iter()
        .flat_map(|i| i.uploads.iter().filter(|u| u.stored))
        .fold(BTreeMap::new(), |mut m, u| {
            m.entry(u.field_name.clone())
                .or_default()
                .insert(u.sha256.clone());
            m
        });
    for w in &written {
        let name = Path::new(&w.rel).file_name().unwrap().to_string_lossy();
        let intact = stored_by_name
            .get(name.as_ref())
            .is_some_and(|shas| shas.contains(&w.sha));
        if !intact {
            f.lost += 1;
            eprintln!("LOST: {} ({} bytes) never stored intact", w.rel, w.len);
        }
        let moved = std::fs::read(done.join(&w.rel)).unwrap();
        assert_eq!(sha256(&moved), w.sha, "{} changed by the move", w.rel);
    }
    assert_eq!(f.lost, 0, "files lost");
    let left: Vec<PathBuf> = walk_recordings(&rec);
    assert!(left.is_empty(), "recordings left behind: {left:?}");
    assert!(
        counted_orphans as usize >= f.orphan_declares,
        "the queue counted {counted_orphans} orphan declares, the fake holds {} interactions without audio",
        f.orphan_declares
    );
    assert!(
        f.orphan_declares <= plan.kills * 4,
        "more orphan declares ({}) than kills × workers",
        f.orphan_declares
    );
    f.seconds = started.elapsed().as_secs_f64();
    f
}

fn walk_recordings(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_recordings(&p));
        } else if p.extension().is_some_and(|x| x == "wav") {
            out.push(p);
        }
    }
    out
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The very first start is the one moment a database is being created. Killed anywhere in it, the
/// next start must come up (before the fix, about one kill in ten there left a hot journal or an
/// unstamped schema that every later start refused with exit 78).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_kills_during_the_first_start_never_leave_an_unusable_database() {
    let seed: u64 = env_or("CALLFERRY_SOAK_SEED", std::process::id() as u64);
    let mut rng = StdRng::seed_from_u64(seed);
    for round in 0..30 {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("rec")).unwrap();
        let cfg = write_config(dir.path(), "http://127.0.0.1:9/v1", "");
        let log = dir.path().join("daemon.log");
        let mut d = Daemon::spawn(&cfg, &log, &[]);
        let state = dir.path().join("state");
        let start = Instant::now();
        while !state.exists() && start.elapsed() < DEADLINE {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_micros(rng.random_range(0..25_000))).await;
        d.kill9().await;
        d.wait(DEADLINE).await;
        let mut d = Daemon::spawn(&cfg, &log, &[]);
        d.wait_log("callferry running").await;
        d.signal(libc::SIGTERM);
        assert_eq!(
            d.wait(DEADLINE).await.code(),
            Some(0),
            "round {round} (seed {seed}):\n{}",
            d.log_text()
        );
    }
}
