//! Scenario 5, idle: a daemon over a tree that is all uploaded already, its CPU per minute and
//! wake-ups next to a Python `sleep(1)` loop measured in the same window; it must make no API
//! request and leave the queue as it was.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};

use super::fresh;
use crate::harness::{self, Daemon, DaemonSetup, Fake, make_files};
use crate::{Ctx, Report};

pub async fn idle(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    let n = ctx.mode.pick(10_000, 10_000, 200);
    let window = Duration::from_secs(ctx.mode.pick(60, 20, 2));
    let watch = ctx.work.join("s5/rec");
    let files = make_files(&watch, n, 1024, "old-", Some(1000))?;
    let dir = fresh(&ctx.work.join("runs/idle"))?;
    let db = dir.join("db/queue.db");
    seed_uploaded(&db, &watch, &files).await?;
    let fake = Fake::start(&ctx.exe, &dir.join("fake.log")).await?;
    let setup = DaemonSetup::new(&watch, &db);
    let cfg = dir.join("callferry.toml");
    setup.write_config(&fake.base, &cfg)?;
    let mut d = Daemon::start(&ctx.exe, &cfg, &dir.join("daemon.log"))?;
    d.wait_running(Duration::from_secs(60)).await?;
    // The reference: the most trivial idle program, measured over the same window on the same
    // machine, so the figures compare whatever a wake-up costs here.
    // Without python3 (a bare CI image) the row still gives the daemon's own figures.
    let mut sleeper = std::process::Command::new("python3")
        .args(["-c", "import time\nwhile True: time.sleep(1)"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .ok();
    let sleeper_cpu = |s: &Option<std::process::Child>| match s {
        Some(c) => harness::cpu(c.id()).map(Some),
        None => Ok(None),
    };
    // Let start-up work finish before the window opens: the first scan, and the blocking pool's
    // threads, which end 10 s after their last call.
    tokio::time::sleep(Duration::from_secs(ctx.mode.pick(15, 12, 1))).await;
    let (a, la) = (harness::cpu(d.pid())?, sleeper_cpu(&sleeper)?);
    tokio::time::sleep(window).await;
    let (b, lb) = (harness::cpu(d.pid())?, sleeper_cpu(&sleeper)?);
    if let Some(s) = sleeper.as_mut() {
        let _ = s.kill();
        let _ = s.wait();
    }
    let c = fake.counters().await?;
    let (st, _) = harness::status(&ctx.exe, &cfg)?;
    d.stop()?;
    if c.declares != 0 || c.requests != 0 {
        bail!(
            "idle daemon made {} API requests ({} declares)",
            c.requests,
            c.declares
        );
    }
    if st["counts"]["uploaded"].as_u64() != Some(n as u64) || harness::status_total(&st) != n as u64
    {
        bail!("idle daemon's queue changed: {st}");
    }
    let per_min = |(ns, _): (u64, u64)| ns as f64 / 1e6 * 60.0 / window.as_secs_f64();
    let per_s = |(_, runs): (u64, u64)| runs as f64 / window.as_secs_f64();
    let ours = a.since(&b);
    let (ms, wakeups) = (per_min(ours), per_s(ours));
    let reference = la.zip(lb).map(|(la, lb)| la.since(&lb));
    let (vs, cheap_enough) = match reference {
        Some(theirs) => {
            let (loop_ms, loop_wakeups) = (per_min(theirs), per_s(theirs));
            // A loop that cost nothing measurable: compare with a microsecond instead of dividing
            // by zero.
            let ratio = ms / loop_ms.max(0.001);
            (
                format!("loop: {loop_ms:.1} ms/min, {loop_wakeups:.2}/s; {ratio:.2}× the loop"),
                ms <= loop_ms,
            )
        }
        None => ("no python3 here for the reference loop".to_string(), true),
    };
    rep.row(
        "5",
        format!(
            "idle, {n} uploaded files in the watched tree: CPU per minute and wake-ups, next to a \
             Python sleep(1) loop in the same {} s",
            window.as_secs()
        ),
        format!("{ms:.1} ms/min, {wakeups:.2} wake-ups/s ({vs}), 0 API requests"),
        "≤ 0.2 wake-ups/s, ≤ 1.0× the loop's CPU",
        Some(wakeups <= 0.2 && cheap_enough),
    );
    let _ = std::fs::remove_dir_all(&watch);
    Ok(())
}

/// The files are already uploaded: their versions are in the queue as `uploaded`.
async fn seed_uploaded(db: &Path, watch: &Path, files: &[PathBuf]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let q = callferry::queue::Queue::open(db, callferry::queue::OpenMode::Create).await?;
    let mut jobs = Vec::new();
    for f in files {
        let m = std::fs::metadata(f)?;
        jobs.push(callferry::queue::NewJob {
            path: f.clone(),
            root: watch.to_path_buf(),
            size: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            dev: m.dev(),
            ino: m.ino(),
        });
    }
    for chunk in jobs.chunks(2000) {
        q.enqueue(chunk, harness::now_ms() as i64).await?;
    }
    q.close().await;
    use sqlx::Connection;
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display())).await?;
    sqlx::query(
        "UPDATE jobs SET state = 'uploaded', upload_status = 201, \
         interaction_id = printf('%08x-0000-4000-8000-%012x', id, id)",
    )
    .execute(&mut c)
    .await?;
    c.close().await?;
    Ok(())
}
