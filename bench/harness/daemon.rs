//! `callferry run` as a child process: the config it is given, its start (read from its JSON log),
//! its stop, and `callferry status --json` against the same config.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{TOKEN, poll, tail, vm_hwm_kib};

/// What a daemon run is configured with, beyond the basics.
#[derive(Clone, Debug)]
pub struct DaemonSetup {
    pub watch: PathBuf,
    pub database: PathBuf,
    pub workers: Option<usize>,
    pub settle: Duration,
    pub max_bytes_per_sec: u64,
    /// `[api] ca_file`: the CA of a fake that serves HTTPS.
    pub ca_file: Option<PathBuf>,
}

impl DaemonSetup {
    pub fn new(watch: &Path, database: &Path) -> DaemonSetup {
        DaemonSetup {
            watch: watch.to_path_buf(),
            database: database.to_path_buf(),
            workers: None,
            settle: Duration::from_secs(1),
            max_bytes_per_sec: 0,
            ca_file: None,
        }
    }

    /// Writes a config file (JSON logs, so timestamps and fields can be read back).
    pub fn write_config(&self, base_url: &str, path: &Path) -> Result<()> {
        let workers = self
            .workers
            .map(|w| format!("workers = {w}\n"))
            .unwrap_or_default();
        let ca = self
            .ca_file
            .as_ref()
            .map(|c| format!("ca_file = \"{}\"\n", c.display()))
            .unwrap_or_default();
        let text = format!(
            "[api]\nbase_url = \"{base_url}\"\ntoken = \"{TOKEN}\"\nstall_timeout = \"60s\"\n{ca}\
             [watch]\npaths = [\"{watch}\"]\nsettle = \"{settle}ms\"\n\
             [queue]\ndatabase = \"{db}\"\n\
             [upload]\n{workers}max_bytes_per_sec = {bw}\nbackoff_initial = \"100ms\"\n\
             backoff_max = \"1s\"\nshutdown_grace = \"5s\"\n\
             [log]\nformat = \"json\"\nlevel = \"info\"\n",
            watch = self.watch.display(),
            settle = self.settle.as_millis(),
            db = self.database.display(),
            bw = self.max_bytes_per_sec,
        );
        std::fs::write(path, text)?;
        Ok(())
    }
}

/// `callferry run` as a child process.
pub struct Daemon {
    child: Child,
    pub log: PathBuf,
    pub spawned: Instant,
}

impl Daemon {
    pub fn start(exe: &Path, config: &Path, log: &Path) -> Result<Daemon> {
        let child = Command::new(exe)
            .arg("--config")
            .arg(config)
            .arg("run")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log)?)
            .spawn()
            .with_context(|| format!("cannot start {} run", exe.display()))?;
        Ok(Daemon {
            child,
            log: log.to_path_buf(),
            spawned: Instant::now(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the "callferry running" log line (first scan queued, workers started).
    pub async fn wait_running(&mut self, deadline: Duration) -> Result<Duration> {
        let log = self.log.clone();
        poll(
            "the daemon to start",
            deadline,
            Duration::from_millis(10),
            || {
                let exited = self.child.try_wait().ok().flatten();
                let log = log.clone();
                async move {
                    if let Some(st) = exited {
                        bail!(
                            "the daemon exited ({st}) during start: {}",
                            tail(&log, 2000)
                        );
                    }
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    Ok(text.contains("\"callferry running\"").then_some(()))
                }
            },
        )
        .await?;
        Ok(self.spawned.elapsed())
    }

    pub fn hwm_kib(&self) -> Result<u64> {
        vm_hwm_kib(self.pid())
    }

    /// SIGTERM, then waits for the exit; a non-zero exit is an error.
    pub fn stop(mut self) -> Result<()> {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait()?;
        if !st.success() {
            bail!("the daemon exited with {st}: {}", tail(&self.log, 2000));
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `callferry status --json`: the parsed answer and how long the whole command took.
pub fn status(exe: &Path, config: &Path) -> Result<(serde_json::Value, Duration)> {
    let t = Instant::now();
    let out = Command::new(exe)
        .arg("--config")
        .arg(config)
        .args(["status", "--json"])
        .stdin(Stdio::null())
        .output()?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!(
            "callferry status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((serde_json::from_slice(&out.stdout)?, took))
}

pub fn status_total(v: &serde_json::Value) -> u64 {
    v["counts"]
        .as_object()
        .map(|m| m.values().filter_map(|x| x.as_u64()).sum())
        .unwrap_or(0)
}
