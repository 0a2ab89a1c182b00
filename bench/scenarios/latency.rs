//! Scenario 4, latency: files completed at a steady rate while the daemon runs; the time from a
//! file's last write to its declare reaching the fake, minus the settle time.

use std::time::Duration;

use anyhow::Result;

use super::{MIB, fresh};
use crate::harness::{self, Daemon, DaemonSetup, Fake, check_exactly_once, percentile};
use crate::{Ctx, Mode, Report};

pub async fn latency(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    let rate = ctx.mode.pick(50, 50, 10);
    let secs = ctx.mode.pick(30, 10, 2);
    let size = ctx.mode.pick(MIB, MIB, 16 * 1024);
    let settle = Duration::from_millis(ctx.mode.pick(2000, 2000, 300));
    let n = rate * secs;
    let dir = fresh(&ctx.work.join("runs/latency"))?;
    let watch = fresh(&ctx.work.join("s4/rec"))?;
    let fake = Fake::start(&ctx.exe, &dir.join("fake.log")).await?;
    let mut setup = DaemonSetup::new(&watch, &dir.join("db/queue.db"));
    setup.settle = settle;
    let cfg = dir.join("callferry.toml");
    setup.write_config(&fake.base, &cfg)?;
    let mut d = Daemon::start(&ctx.exe, &cfg, &dir.join("daemon.log"))?;
    d.wait_running(Duration::from_secs(60)).await?;
    let block = harness::noise(size, 3);
    let mut complete_ms = std::collections::HashMap::new();
    let mut files = Vec::new();
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..n {
        tick.tick().await;
        // Written in place in one go and closed, as a recorder finishing a call; it is complete
        // at its last write, i.e. its mtime.
        let name = format!("live-{i:06}.wav");
        let path = watch.join(&name);
        harness::write_file(&path, size, &block, i as u64)?;
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&path)?;
        let mtime_ms = m.mtime() * 1000 + m.mtime_nsec() / 1_000_000;
        complete_ms.insert(name, mtime_ms);
        files.push(path);
    }
    fake.wait_stored(n as u64, Duration::from_secs(120)).await?;
    let recs = fake.interactions().await?;
    d.stop()?;
    check_exactly_once(&recs, &files, ctx.mode == Mode::Smoke)?;
    let mut lat: Vec<f64> = recs
        .iter()
        .filter_map(|r| {
            let name = r.declare_body["originalFilename"].as_str()?;
            let done = complete_ms.get(name)?;
            Some(r.declared_at_ms as f64 - *done as f64 - settle.as_millis() as f64)
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    let p99 = percentile(&lat, 99.0);
    rep.row(
        "4",
        format!(
            "file complete → upload starts (declare reaches the fake), minus settle ({} ms), {rate} files/s × {secs} s of {} KiB",
            settle.as_millis(),
            size / 1024
        ),
        format!(
            "p50 {:.0} ms, p99 {p99:.0} ms, max {:.0} ms",
            percentile(&lat, 50.0),
            lat[lat.len() - 1]
        ),
        "p99 ≤ 250 ms",
        Some(p99 <= 250.0),
    );
    Ok(())
}
