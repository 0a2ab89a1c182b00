//! Scenario 2, one large file: throughput next to `curl -F` of the same file, and the daemon's
//! peak RSS, which must stay flat as the file grows.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use super::{MIB, big_file, fresh, logged_upload_seconds, loopback_ceiling, mbps, pct};
use crate::harness::{self, Daemon, DaemonSetup, Fake, check_exactly_once};
use crate::{Ctx, Mode, Report};

pub async fn large(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    let sizes: Vec<usize> = ctx
        .mode
        .pick(vec![256, 512, 1024], vec![64, 256], vec![8, 16]);
    let mut hwms = Vec::new();
    let curl = harness::have("curl") && ctx.mode != Mode::Smoke;
    for mib in &sizes {
        let file = big_file(ctx, *mib)?;
        let watch = file.parent().unwrap_or(Path::new("/")).to_path_buf();
        let name = format!("large-{mib}");
        let dir = fresh(&ctx.work.join("runs").join(&name))?;
        let baseline = if curl {
            Some(loopback_ceiling(ctx, &file).await?)
        } else {
            None
        };
        let fake = Fake::start(&ctx.exe, &dir.join("fake.log")).await?;
        let setup = DaemonSetup::new(&watch, &dir.join("db/queue.db"));
        let cfg = dir.join("callferry.toml");
        setup.write_config(&fake.base, &cfg)?;
        let mut d = Daemon::start(&ctx.exe, &cfg, &dir.join("daemon.log"))?;
        d.wait_running(Duration::from_secs(60)).await?;
        fake.wait_stored(1, Duration::from_secs(600)).await?;
        // The log line is written just before the outcome is committed; wait for it.
        let secs = harness::poll(
            "the upload's log line",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || async { Ok(logged_upload_seconds(&d.log)) },
        )
        .await?;
        let hwm = d.hwm_kib()? as f64 / 1024.0;
        d.stop()?;
        let recs = fake.interactions().await?;
        check_exactly_once(&recs, std::slice::from_ref(&file), ctx.mode == Mode::Smoke)?;
        let rate = (*mib * MIB) as f64 / secs;
        hwms.push(hwm);
        let (value, met) = match baseline {
            Some(b) => (
                format!(
                    "{} vs curl {} = {}; peak RSS {hwm:.1} MiB",
                    mbps(rate),
                    mbps(b),
                    pct(rate / b)
                ),
                Some(rate >= 0.9 * b && hwm < 32.0),
            ),
            None => (format!("{}; peak RSS {hwm:.1} MiB", mbps(rate)), None),
        };
        rep.row(
            "2",
            format!("one {mib} MiB file: callferry throughput and VmHWM"),
            value,
            "≥ 90 % of curl; < 32 MiB",
            met,
        );
    }
    let (lo, hi) = hwms
        .iter()
        .fold((f64::MAX, 0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
    rep.row(
        "2",
        format!(
            "peak RSS growth from {} MiB to {} MiB file",
            sizes[0],
            sizes[sizes.len() - 1]
        ),
        format!("{:+.1} MiB", hi - lo),
        "flat (< 2 MiB)",
        Some(hi - lo < 2.0),
    );
    Ok(())
}
