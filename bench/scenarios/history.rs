//! Scenario 7: what years of history cost. A tree of recordings that are all
//! uploaded already (the database says so), rescanned by the daemon every few seconds: its CPU per
//! rescan next to a plain walk-and-stat of the same tree (Python's `os.walk` + `os.stat`, and
//! walkdir + `lstat` in Rust), then the database's size before and after pruning, and a daemon on
//! the pruned database, which must upload nothing again.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::harness::{self, Daemon, Fake, TOKEN};
use crate::{Ctx, Mode, Report};

const FILES_PER_FOLDER: usize = 200;
const DAY_MS: i64 = 86_400_000;

pub async fn history(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    for n in ctx
        .mode
        .pick(vec![20_000, 200_000], vec![20_000], vec![300])
    {
        one(ctx, rep, n).await?;
    }
    Ok(())
}

/// A date-folder tree of `n` recordings: sparse files (a `stat` is all a known one should cost,
/// so their blocks do not matter).
fn make_tree(root: &Path, n: usize) -> Result<Vec<PathBuf>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let day = i / FILES_PER_FOLDER;
        let dir = root.join(format!(
            "{}/{:02}/{:02}",
            2020 + day / 360,
            1 + (day / 30) % 12,
            1 + day % 30
        ));
        if i % FILES_PER_FOLDER == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        let p = dir.join(format!("out-5551234-1001-{i:08}.wav"));
        let f = std::fs::File::create(&p)?;
        f.set_len(64 * 1024 + (i as u64 % 4096))?;
        out.push(p);
    }
    Ok(out)
}

/// The queue as a daemon leaves it after uploading them all, `age_days` ago: each job uploaded,
/// with its three events (queued, declared, uploaded).
async fn seed(db: &Path, root: &Path, files: &[PathBuf], age_days: i64) -> Result<()> {
    use sqlx::Connection;
    let q = callferry::queue::Queue::open(db, callferry::queue::OpenMode::Create).await?;
    let at = harness::now_ms() as i64 - age_days * DAY_MS;
    let mut jobs = Vec::with_capacity(files.len());
    for f in files {
        let m = std::fs::metadata(f)?;
        jobs.push(callferry::queue::NewJob {
            path: f.clone(),
            root: root.to_path_buf(),
            size: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            dev: m.dev(),
            ino: m.ino(),
        });
    }
    for chunk in jobs.chunks(2000) {
        q.enqueue(chunk, at).await?;
    }
    q.close().await;
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display())).await?;
    sqlx::query(
        "UPDATE jobs SET state = 'uploaded', upload_status = 201, uploaded_at = ?1, updated_at = ?1, \
         created_at = ?1, interaction_id = printf('%08x-0000-4000-8000-%012x', id, id)",
    )
    .bind(at)
    .execute(&mut c)
    .await?;
    sqlx::query(
        "INSERT INTO job_events (job_id, at, event, detail) \
         SELECT id, ?1, 'declared', interaction_id FROM jobs UNION ALL \
         SELECT id, ?1, 'uploaded', '201' FROM jobs",
    )
    .bind(at)
    .execute(&mut c)
    .await?;
    sqlx::query("UPDATE job_events SET at = ? WHERE event = 'queued'")
        .bind(at)
        .execute(&mut c)
        .await?;
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut c)
        .await?;
    c.close().await?;
    Ok(())
}

/// (bytes in use, file size) of the database, after a checkpoint.
async fn db_size(db: &Path) -> Result<(u64, u64)> {
    use sqlx::Connection;
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display())).await?;
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut c)
        .await?;
    let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
        .fetch_one(&mut c)
        .await?;
    let free: i64 = sqlx::query_scalar("PRAGMA freelist_count")
        .fetch_one(&mut c)
        .await?;
    let page: i64 = sqlx::query_scalar("PRAGMA page_size")
        .fetch_one(&mut c)
        .await?;
    c.close().await?;
    Ok((((pages - free) * page) as u64, std::fs::metadata(db)?.len()))
}

/// CPU seconds a process has used, its exited threads included (the blocking pool's threads come
/// and go; a per-thread sum would lose the walks of those that left).
fn process_cpu(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command.
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

async fn rescans(metrics: &str) -> Result<u64> {
    let text = reqwest::get(metrics).await?.text().await?;
    text.lines()
        .find_map(|l| l.strip_prefix("callferry_watcher_rescans_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .context("no callferry_watcher_rescans_total in /metrics")
}

/// Runs a daemon over the tree and measures its CPU over `k` periodic rescans (from one rescan's
/// start to the k-th after it), after start-up has settled. Returns seconds per rescan and the
/// fake's declares.
async fn daemon_rescan_cpu(
    ctx: &Ctx,
    dir: &Path,
    watch: &Path,
    db: &Path,
    keep: &str,
    k: u64,
) -> Result<(f64, u64, Duration)> {
    let fake = Fake::start(&ctx.exe, &dir.join("fake.log")).await?;
    let port = harness::free_port()?;
    let cfg = dir.join("callferry.toml");
    std::fs::write(
        &cfg,
        format!(
            "[api]\nbase_url = \"{base}\"\ntoken = \"{TOKEN}\"\n\
             [watch]\npaths = [\"{watch}\"]\nsettle = \"1s\"\nrescan_interval = \"{every}s\"\n\
             [queue]\ndatabase = \"{db}\"\nkeep_history = \"{keep}\"\n\
             [metrics]\nlisten = \"127.0.0.1:{port}\"\n\
             [log]\nformat = \"json\"\nlevel = \"info\"\n",
            base = fake.base,
            watch = watch.display(),
            every = ctx.mode.pick(3, 3, 1),
            db = db.display(),
        ),
    )?;
    let mut d = Daemon::start(&ctx.exe, &cfg, &dir.join(format!("daemon-{keep}.log")))?;
    let ready = d.wait_running(Duration::from_secs(120)).await?;
    let url = format!("http://127.0.0.1:{port}/metrics");
    // Start-up's own scan and the first periodic one pass before the window opens.
    let wait = |target: u64| {
        let url = url.clone();
        harness::poll(
            "the daemon's rescans",
            Duration::from_secs(300),
            Duration::from_millis(20),
            move || {
                let url = url.clone();
                async move { Ok((rescans(&url).await.unwrap_or(0) >= target).then_some(())) }
            },
        )
    };
    wait(2).await?;
    let r0 = rescans(&url).await?;
    wait(r0 + 1).await?;
    let a = process_cpu(d.pid())?;
    wait(r0 + 1 + k).await?;
    let b = process_cpu(d.pid())?;
    let declares = fake.counters().await?.declares;
    d.stop()?;
    Ok(((b - a) / k as f64, declares, ready))
}

/// Median CPU seconds of a Python `os.walk` + `os.stat` of every file (the interpreter's start-up
/// excluded), or None without Python.
fn python_walk(root: &Path) -> Option<f64> {
    let script = "import os, sys, time\n\
        t = time.process_time()\n\
        n = 0\n\
        for d, _, fs in os.walk(sys.argv[1]):\n\
        \x20   for f in fs:\n\
        \x20       os.stat(os.path.join(d, f))\n\
        \x20       n += 1\n\
        print(time.process_time() - t)\n";
    let mut runs = Vec::new();
    for _ in 0..3 {
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(root)
            .output()
            .ok()?;
        runs.push(
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<f64>()
                .ok()?,
        );
    }
    runs.sort_by(f64::total_cmp);
    Some(runs[1])
}

/// Median thread CPU seconds of a walkdir walk with an `lstat` of every file, in this process.
fn rust_walk(root: &Path) -> f64 {
    let thread_cpu = || {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
    };
    let mut runs = Vec::new();
    for _ in 0..3 {
        let t = thread_cpu();
        let mut n = 0usize;
        for e in walkdir::WalkDir::new(root).into_iter().flatten() {
            if e.file_type().is_file() && e.metadata().is_ok() {
                n += 1;
            }
        }
        std::hint::black_box(n);
        runs.push(thread_cpu() - t);
    }
    runs.sort_by(f64::total_cmp);
    runs[1]
}

async fn one(ctx: &Ctx, rep: &mut Report, n: usize) -> Result<()> {
    let dir = ctx.work.join(format!("runs/history-{n}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let watch = dir.join("rec");
    let db = dir.join("db/queue.db");
    let t = Instant::now();
    let files = {
        let w = watch.clone();
        tokio::task::spawn_blocking(move || make_tree(&w, n)).await??
    };
    // Uploaded 100 days ago: past the default keep_history (90 days).
    seed(&db, &watch, &files, 100).await?;
    drop(files);
    eprintln!(
        "bench: history: {n} uploaded recordings made and queued in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let tree = Tree {
        dir,
        watch,
        db,
        n,
        k: ctx.mode.pick(5, 3, 2),
    };
    let base = rescan_keeping_all(ctx, rep, &tree).await?;
    prune(rep, &tree).await?;
    rescan_after_pruning(ctx, rep, &tree, base).await?;
    let _ = std::fs::remove_dir_all(&tree.watch);
    Ok(())
}

/// One size of history: its folder, its tree of recordings, their queue, and how many rescans
/// each CPU figure is the mean of.
struct Tree {
    dir: PathBuf,
    watch: PathBuf,
    db: PathBuf,
    n: usize,
    k: u64,
}

/// A daemon that keeps everything: every version is a job. Its CPU per rescan next to a plain
/// walk-and-stat of the tree, and its start-up; returns the walk's time (Python's, else Rust's).
async fn rescan_keeping_all(ctx: &Ctx, rep: &mut Report, tree: &Tree) -> Result<f64> {
    let Tree {
        dir,
        watch,
        db,
        n,
        k,
        ..
    } = tree;
    let (per, declares, ready) = daemon_rescan_cpu(ctx, dir, watch, db, "0s", *k).await?;
    if declares != 0 {
        bail!("the daemon declared {declares} files that were all uploaded already");
    }
    let w = watch.clone();
    let rust = tokio::task::spawn_blocking(move || rust_walk(&w)).await?;
    let py = if ctx.mode == Mode::Smoke {
        None
    } else {
        python_walk(watch)
    };
    let base = py.unwrap_or(rust);
    let ratio = per / base;
    rep.row(
        "7",
        format!("rescan of {n} uploaded recordings: daemon CPU per periodic rescan (mean of {k})"),
        format!(
            "{:.0} ms; plain walk+stat of the tree: Python {}, Rust walkdir {:.0} ms; {ratio:.1}× {}",
            per * 1000.0,
            py.map_or("n/a".into(), |p| format!("{:.0} ms", p * 1000.0)),
            rust * 1000.0,
            if py.is_some() { "Python's" } else { "Rust's" },
        ),
        "≤ 2× walk+stat",
        Some(ratio <= 2.0),
    );
    rep.row(
        "7",
        format!("start-up with {n} uploaded recordings: spawn → READY"),
        format!("{:.0} ms", ready.as_secs_f64() * 1000.0),
        "",
        None,
    );
    Ok(base)
}

/// Pruning: the jobs and their events go, fingerprints stay. The database's size before and after.
async fn prune(rep: &mut Report, tree: &Tree) -> Result<()> {
    let Tree { db, n, .. } = tree;
    let (live0, file0) = db_size(db).await?;
    let q = callferry::queue::Queue::open(db, callferry::queue::OpenMode::Create).await?;
    let t = Instant::now();
    let cutoff = harness::now_ms() as i64 - 90 * DAY_MS;
    let pruned = q.prune(cutoff, true).await?;
    let took = t.elapsed();
    q.close().await;
    if pruned != *n as u64 {
        bail!("pruned {pruned} jobs of {n}");
    }
    let (live1, file1) = db_size(db).await?;
    rep.row(
        "7",
        format!("database with {n} uploaded jobs (3 events each), before → after pruning them"),
        format!(
            "{:.1} MiB ({} bytes/job) → {:.2} MiB in use ({} bytes/job) in {:.1} s; the file stays {:.1} MiB, its free pages reused by new jobs",
            live0 as f64 / (1 << 20) as f64,
            live0 / *n as u64,
            live1 as f64 / (1 << 20) as f64,
            live1 / *n as u64,
            took.as_secs_f64(),
            file1 as f64 / (1 << 20) as f64,
        ),
        "",
        None,
    );
    let _ = file0;
    Ok(())
}

/// A daemon on the pruned database: fingerprints alone keep the tree from being uploaded again,
/// and a rescan costs the same.
async fn rescan_after_pruning(ctx: &Ctx, rep: &mut Report, tree: &Tree, base: f64) -> Result<()> {
    let Tree {
        dir,
        watch,
        db,
        n,
        k,
        ..
    } = tree;
    let (per, declares, _) = daemon_rescan_cpu(ctx, dir, watch, db, "90d", *k).await?;
    if declares != 0 {
        bail!("after pruning, the daemon declared {declares} files that were uploaded already");
    }
    rep.row(
        "7",
        format!("rescan of the same {n} recordings after pruning (fingerprints only)"),
        format!(
            "{:.0} ms per rescan, {:.1}× walk+stat; 0 declared again",
            per * 1000.0,
            per / base
        ),
        "≤ 2× walk+stat; 0 re-uploads",
        Some(per / base <= 2.0),
    );
    Ok(())
}
