//! The daemon as a separate process: `callferry run` with a generated config, its log in a file,
//! stopped by SIGTERM or killed by SIGKILL.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use callferry::queue::{OpenMode, Queue};

use crate::helpers::{DEADLINE, poll_for};

pub fn callferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_callferry"));
    c.env_remove("CALLFERRY_CONFIG")
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .kill_on_drop(true);
    c
}

pub struct Daemon {
    child: Child,
    pub log: PathBuf,
    /// Length of the log when this run started: `wait_log` looks only at this run's lines.
    log_start: usize,
}

impl Daemon {
    /// Starts `callferry --config CFG run`, appending its stderr (the log) to `log`.
    pub fn spawn(cfg: &Path, log: &Path, env: &[(&str, &str)]) -> Daemon {
        let log_start = std::fs::metadata(log).map_or(0, |m| m.len() as usize);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = callferry();
        cmd.arg("--config")
            .arg(cfg)
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Daemon {
            child: cmd.spawn().expect("spawn callferry run"),
            log: log.to_path_buf(),
            log_start,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("still running") as i32
    }

    /// Whether it has exited on its own (it never should while a test expects it to run).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// `kill -9`: no chance to clean up anything.
    pub async fn kill9(&mut self) {
        if let Some(st) = self.exited() {
            panic!(
                "the daemon had already exited ({st}) before the kill:\n{}",
                self.log_text()
            );
        }
        self.child.kill().await.unwrap();
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    pub async fn wait(&mut self, limit: Duration) -> ExitStatus {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(st) => st.unwrap(),
            Err(_) => panic!(
                "the daemon did not exit within {limit:?}:\n{}",
                self.log_text()
            ),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls the log until this run's part of it contains `needle`.
    pub async fn wait_log(&mut self, needle: &str) {
        let start = Instant::now();
        while start.elapsed() < DEADLINE {
            if self
                .log_text()
                .get(self.log_start..)
                .is_some_and(|t| t.contains(needle))
            {
                return;
            }
            if let Some(st) = self.exited() {
                panic!(
                    "the daemon exited ({st}) before logging {needle:?}:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "timed out waiting for {needle:?} in the log:\n{}",
            self.log_text()
        );
    }
}

/// Prints the tail of a daemon's log if the test fails while it is alive: a failure in CI (a
/// deadline missed under load) is then diagnosable from the test's own output.
pub struct ShowLogOnPanic(pub PathBuf);

impl Drop for ShowLogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.0).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(150)..];
            eprintln!(
                "--- last {} lines of {} ---\n{}",
                tail.len(),
                self.0.display(),
                tail.join("\n")
            );
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Only this run's part: earlier runs' lines were shown by their own guard or passed.
        if std::thread::panicking() {
            let text = self.log_text();
            let run = text.get(self.log_start..).unwrap_or(&text);
            let lines: Vec<&str> = run.lines().collect();
            let tail = &lines[lines.len().saturating_sub(150)..];
            eprintln!(
                "--- this daemon run's log, last {} lines ---\n{}",
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// Opens the queue database once the daemon has created it (and its tables).
pub async fn queue_when_ready(db: &Path) -> Queue {
    poll_for("the queue database", || async {
        let q = Queue::open(db, OpenMode::Existing).await.ok()?;
        if q.counts().await.is_ok() {
            Some(q)
        } else {
            q.close().await;
            None
        }
    })
    .await
}

/// Writes a config file for the binary (see `helpers::config_text`) and returns its path.
pub fn write_config(dir: &Path, base_url: &str, extra: &str) -> PathBuf {
    let p = dir.join("callferry.toml");
    std::fs::write(&p, crate::helpers::config_text(base_url, dir, extra)).unwrap();
    p
}
