//! Scenario 3, the backlog: a tree of files present at start (how soon all are queued, how fast
//! `status` answers meanwhile, the database's size per job), then `status` on a synthetic
//! database of a million jobs.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::{MIB, fresh};
use crate::harness::{self, Daemon, DaemonSetup, Fake, make_files, percentile};
use crate::{Ctx, Report};

pub async fn backlog(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    let n = ctx.mode.pick(100_000, 100_000, 300);
    let watch = ctx.work.join("s3/rec");
    let t = Instant::now();
    let files = make_files(&watch, n, 1024, "b-", Some(1000))?;
    eprintln!(
        "bench: {n} backlog files made in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let dir = fresh(&ctx.work.join("runs/backlog"))?;
    let fake = Fake::start(&ctx.exe, &dir.join("fake.log")).await?;
    let db = dir.join("db/queue.db");
    let setup = DaemonSetup::new(&watch, &db);
    let cfg = dir.join("callferry.toml");
    setup.write_config(&fake.base, &cfg)?;
    let d = Daemon::start(&ctx.exe, &cfg, &dir.join("daemon.log"))?;
    let mut worst_status = Duration::ZERO;
    let queued = loop {
        if d.spawned.elapsed() > Duration::from_secs(300) {
            bail!("the backlog was not queued within 300 s");
        }
        if let Ok((v, took)) = harness::status(&ctx.exe, &cfg) {
            worst_status = worst_status.max(took);
            if harness::status_total(&v) >= n as u64 {
                break d.spawned.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let uploaded_meanwhile = fake.counters().await?.uploads_stored;
    d.stop()?;
    rep.row(
        "3",
        format!("{n} files present at start: all queued (daemon start → `status` counts them all)"),
        format!(
            "{:.1} s ({uploaded_meanwhile} already uploaded meanwhile)",
            queued.as_secs_f64()
        ),
        "< 10 s",
        Some(queued < Duration::from_secs(10)),
    );
    rep.row(
        "3",
        "`callferry status --json` while the backlog is queued (slowest answer, whole command)",
        format!("{:.0} ms", worst_status.as_secs_f64() * 1000.0),
        "",
        None,
    );
    let db_bytes = std::fs::metadata(&db)?.len()
        + std::fs::metadata(db.with_extension("db-wal")).map_or(0, |m| m.len());
    rep.row(
        "3",
        format!(
            "database size per job ({n} real jobs; path ≈ {} bytes)",
            files[0].to_string_lossy().len()
        ),
        format!("{:.0} bytes", db_bytes as f64 / n as f64),
        "",
        None,
    );
    let _ = std::fs::remove_dir_all(&watch);
    status_on_a_million(ctx, rep).await
}

/// `status` on a synthetic database of a million jobs (the queue of years), and its size per job.
async fn status_on_a_million(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    let jobs = ctx.mode.pick(1_000_000, 1_000_000, 10_000);
    let sdir = fresh(&ctx.work.join("runs/million"))?;
    let sdb = sdir.join("db/queue.db");
    let t = Instant::now();
    synthetic_db(&sdb, jobs).await?;
    eprintln!(
        "bench: synthetic database of {jobs} jobs made in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let scfg = sdir.join("callferry.toml");
    DaemonSetup::new(&sdir, &sdb).write_config("http://127.0.0.1:9/v1", &scfg)?;
    let mut times = Vec::new();
    for _ in 0..ctx.mode.pick(7, 5, 2) {
        let (v, took) = harness::status(&ctx.exe, &scfg)?;
        if harness::status_total(&v) != jobs as u64 {
            bail!(
                "status counted {} of {jobs} jobs",
                harness::status_total(&v)
            );
        }
        times.push(took.as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let median = percentile(&times, 50.0);
    let max = times[times.len() - 1];
    rep.row(
        "3",
        format!("`callferry status --json` with {jobs} jobs ({} job events) in the database, whole command", jobs * 3),
        format!("median {median:.0} ms, slowest {max:.0} ms"),
        "< 100 ms",
        Some(max < 100.0),
    );
    let sbytes = std::fs::metadata(&sdb)?.len()
        + std::fs::metadata(sdb.with_extension("db-wal")).map_or(0, |m| m.len());
    rep.row(
        "3",
        format!("database size per job (synthetic: {jobs} jobs, 3 events each, 60-byte paths)"),
        format!(
            "{:.0} bytes ({:.0} MiB in all)",
            sbytes as f64 / jobs as f64,
            sbytes as f64 / MIB as f64
        ),
        "",
        None,
    );
    let _ = std::fs::remove_dir_all(&sdir);
    Ok(())
}

/// A database made by the daemon's own migrations, filled by SQL with `jobs` uploaded jobs (three
/// events each: queued, declared, uploaded), the 1,000 oldest failed long ago and the 50 newest
/// still pending. The failures are old, so "recent errors" has to look far back.
async fn synthetic_db(db: &Path, jobs: usize) -> Result<()> {
    use sqlx::Connection;
    let q = callferry::queue::Queue::open(db, callferry::queue::OpenMode::Create).await?;
    q.close().await;
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .synchronous(sqlx::sqlite::SqliteSynchronous::Off);
    let mut c = sqlx::SqliteConnection::connect_with(&opts).await?;
    let now = harness::now_ms() as i64;
    let sql = format!(
        "BEGIN;
        WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {jobs})
        INSERT INTO jobs (path, root, size, mtime_ns, dev, ino, state, attempts, next_attempt_at,
                          interaction_id, upload_status, last_error, created_at, updated_at)
        SELECT printf('/var/spool/asterisk/monitor/2026/%04d/call-%09d.wav', x / 1000, x),
               '/var/spool/asterisk/monitor', 1000000 + x, ({now} - ({jobs} - x) * 60) * 1000000,
               2049, x,
               CASE WHEN x <= 1000 THEN 'failed' WHEN x > {jobs} - 50 THEN 'pending' ELSE 'uploaded' END,
               CASE WHEN x <= 1000 THEN 12 ELSE 0 END,
               {now},
               CASE WHEN x > {jobs} - 50 THEN NULL
                    ELSE printf('%08x-0000-4000-8000-%012x', x, x) END,
               CASE WHEN x <= 1000 OR x > {jobs} - 50 THEN NULL ELSE 201 END,
               CASE WHEN x <= 1000 THEN 'HTTP 503: injected 503; gave up after 12 attempts' END,
               {now} - ({jobs} - x) * 60, {now} - ({jobs} - x) * 60
        FROM c;
        INSERT INTO job_events (job_id, at, event, detail)
        SELECT j.id, j.created_at + k.k,
               CASE k.k WHEN 0 THEN 'queued' WHEN 1 THEN 'declared'
                        ELSE CASE j.state WHEN 'failed' THEN 'failed' ELSE 'uploaded' END END,
               CASE k.k WHEN 0 THEN NULL WHEN 1 THEN j.interaction_id
                        ELSE CASE j.state WHEN 'failed' THEN j.last_error ELSE '201' END END
        FROM jobs j, (SELECT 0 AS k UNION ALL SELECT 1 UNION ALL SELECT 2) k
        WHERE j.state <> 'pending' OR k.k = 0
        ORDER BY j.id, k.k;
        COMMIT;"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut c)
        .await?;
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut c)
        .await?;
    c.close().await?;
    Ok(())
}
