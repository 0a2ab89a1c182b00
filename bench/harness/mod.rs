//! The pieces every scenario uses, by what they own: the fake and the daemon as child processes
//! (`fake`, `daemon`), the recordings made and the check that each arrived exactly once (`files`),
//! the kernel's view of a process and the figures' arithmetic (`measure`), and the `curl -F`
//! baselines (`curl`). This file keeps the small tools they all share.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Result, bail};

mod curl;
mod daemon;
mod fake;
mod files;
mod measure;

pub use curl::{curl_upload, curl_upload_measured};
pub use daemon::{Daemon, DaemonSetup, status, status_total};
pub use fake::Fake;
pub use files::{check_exactly_once, make_files, noise, write_file};
pub use measure::{Measured, ProcCpu, cpu, load_avg, percentile, run_measured, span_s, vm_hwm_kib};

pub const TOKEN: &str = "bench-token-5c1d";

/// Unix time in ms.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Polls `f` every `every` until it yields a value; fails after `deadline`.
pub async fn poll<T, F, Fut>(what: &str, deadline: Duration, every: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

pub fn tail(path: &Path, n: usize) -> String {
    let t = std::fs::read_to_string(path).unwrap_or_default();
    let start = t.len().saturating_sub(n);
    let start = (start..t.len())
        .find(|i| t.is_char_boundary(*i))
        .unwrap_or(t.len());
    t[start..].to_string()
}

pub fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
