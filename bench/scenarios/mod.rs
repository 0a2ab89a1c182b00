//! The nine scenarios, one file per scenario (8 and 9 share theirs), and what several of them
//! share: the folder each run starts afresh, the large file, the loopback ceiling, reading
//! figures back from the daemon's JSON log, and the units the table prints. Each scenario starts
//! its own fake and daemon, so every figure comes from a fresh process with its own counters, RSS
//! and CPU time.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::Ctx;
use crate::harness::{self, Fake};

mod backlog;
mod bandwidth;
mod history;
mod https;
mod idle;
mod large;
mod latency;
mod small_files;

pub use backlog::backlog;
pub use bandwidth::bandwidth;
pub use history::history;
pub use https::{cpu_per_call, https};
pub use idle::idle;
pub use large::large;
pub use latency::latency;
pub use small_files::many_small;

pub(crate) const MIB: usize = 1 << 20;
const MB: f64 = 1e6;

pub(crate) fn mbps(bytes_per_s: f64) -> String {
    format!("{:.0} MB/s", bytes_per_s / MB)
}

pub(crate) fn pct(x: f64) -> String {
    format!("{:.0} %", x * 100.0)
}

pub(crate) fn fresh(dir: &Path) -> Result<PathBuf> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    Ok(dir.to_path_buf())
}

/// The daemon's `workers` as it logged them at start.
fn logged_workers(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"callferry running\""))
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["workers"].as_u64())
        .unwrap_or(0) as usize
}

pub(crate) fn logged_upload_seconds(log: &Path) -> Option<f64> {
    std::fs::read_to_string(log)
        .ok()?
        .lines()
        .filter(|l| l.contains("\"uploaded\""))
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["seconds"].as_f64())
}

/// A large file shared by scenarios 1 and 2.
pub(crate) fn big_file(ctx: &Ctx, mib: usize) -> Result<PathBuf> {
    let dir = ctx.work.join(format!("big-{mib}"));
    let path = dir.join(format!("big-{mib}mib.wav"));
    if !path.exists() {
        std::fs::create_dir_all(&dir)?;
        let block = harness::noise(MIB, 11);
        harness::write_file(&path, mib * MIB, &block, mib as u64)?;
    }
    Ok(path)
}

/// `curl -F` of one large file to a fresh fake: the rate bytes move here at all.
pub(crate) async fn loopback_ceiling(ctx: &Ctx, file: &Path) -> Result<f64> {
    let dir = fresh(&ctx.work.join("runs/ceiling"))?;
    let fake = Fake::start(&ctx.exe, &dir.join("fake.log")).await?;
    let rate = harness::curl_upload(&fake, file).await?;
    Ok(rate)
}
