//! Scenario 6, the bandwidth limit: `max_bytes_per_sec` against the rate the fake measures
//! (from 10 % to 90 % of the bytes, so start-up and the last file's tail do not count).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::{MIB, fresh, logged_workers};
use crate::harness::{Daemon, DaemonSetup, Fake, check_exactly_once, make_files};
use crate::{Ctx, Mode, Report};

pub async fn bandwidth(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    let limit: u64 = ctx.mode.pick(16, 16, 4) * MIB as u64;
    let (n, size) = ctx.mode.pick((24, 4 * MIB), (12, 4 * MIB), (4, MIB));
    let watch = ctx.work.join("s6/rec");
    let files = make_files(&watch, n, size, "bw-", None)?;
    let dir = fresh(&ctx.work.join("runs/bandwidth"))?;
    let fake = Fake::start(&ctx.exe, &dir.join("fake.log")).await?;
    let mut setup = DaemonSetup::new(&watch, &dir.join("db/queue.db"));
    setup.max_bytes_per_sec = limit;
    let cfg = dir.join("callferry.toml");
    setup.write_config(&fake.base, &cfg)?;
    let mut d = Daemon::start(&ctx.exe, &cfg, &dir.join("daemon.log"))?;
    d.wait_running(Duration::from_secs(60)).await?;
    let t0 = Instant::now();
    let mut samples: Vec<(f64, u64)> = Vec::new();
    loop {
        let c = fake.counters().await?;
        samples.push((t0.elapsed().as_secs_f64(), c.bytes_received));
        if c.uploads_stored >= n as u64 {
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("bandwidth run did not finish");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let recs = fake.interactions().await?;
    let w = logged_workers(&d.log);
    d.stop()?;
    check_exactly_once(&recs, &files, ctx.mode == Mode::Smoke)?;
    let total = samples.last().map_or(0, |s| s.1) as f64;
    let at = |frac: f64| -> f64 {
        let want = total * frac;
        let i = samples.iter().position(|s| s.1 as f64 >= want).unwrap_or(0);
        if i == 0 {
            return samples[0].0;
        }
        let (t1, b1) = samples[i - 1];
        let (t2, b2) = samples[i];
        t1 + (t2 - t1) * (want - b1 as f64) / ((b2 - b1).max(1) as f64)
    };
    let (ta, tb) = (at(0.1), at(0.9));
    let rate = total * 0.8 / (tb - ta).max(1e-3);
    let err = (rate - limit as f64) / limit as f64;
    rep.row(
        "6",
        format!(
            "`max_bytes_per_sec` = {} MiB/s, {n} × {} MiB over {w} workers: measured rate at the fake (10–90 % of the bytes)",
            limit / MIB as u64,
            size / MIB
        ),
        format!("{:.2} MiB/s ({:+.1} %)", rate / MIB as f64, err * 100.0),
        "within ±5 %",
        Some(err.abs() <= 0.05),
    );
    Ok(())
}
