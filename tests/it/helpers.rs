//! Test harness: the daemon in-process against the project's fake ElevateAI, on a temp dir.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use callferry::app::{self, AppError, Handle};
use callferry::config::Config;
use callferry::queue::{Job, OpenMode, Queue};
use callferry_fake::{FakeApi, FakeOptions, InteractionRecord};
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "test-token-7f3a9c";

/// Generous: CI is a loaded 2-core machine. Conditions are polled, so passing tests are fast.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub struct TestApp {
    pub dir: tempfile::TempDir,
    pub rec: PathBuf,
    pub fake: FakeApi,
    pub extra_toml: String,
    pub handle: Handle,
    shutdown: CancellationToken,
    daemon: Option<JoinHandle<Result<(), AppError>>>,
}

pub fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn wav(seconds: f64) -> Vec<u8> {
    callferry_fake::wav_bytes(seconds, 440.0)
}

/// Polls `cond` until it is true or the deadline passes.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out after {DEADLINE:?} waiting for: {what}");
}

/// Polls `f` until it yields a value or the deadline passes.
pub async fn poll_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out after {DEADLINE:?} waiting for: {what}");
}

pub fn config_text(base_url: &str, dir: &Path, extra: &str) -> String {
    // `extra` may re-open any section; later keys in a re-opened table would be a TOML error, so
    // sections are built by merging.
    let mut sections: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let base = format!(
        r#"
[api]
base_url = "{base_url}"
token = "{TOKEN}"
pause_recheck = "200ms"
stall_timeout = "5s"
[watch]
paths = ["{rec}"]
settle = "300ms"
rescan_interval = "10m"
[queue]
database = "{db}"
[upload]
workers = 2
backoff_initial = "50ms"
backoff_max = "400ms"
shutdown_grace = "5s"
"#,
        rec = dir.join("rec").display(),
        db = dir.join("state/queue.db").display(),
    );
    let mut current = String::new();
    for line in base.lines().chain(extra.lines()) {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            current = line.to_string();
            sections.entry(current.clone()).or_default();
            continue;
        }
        let key = line.split('=').next().unwrap_or("").trim().to_string();
        let entry = sections.entry(current.clone()).or_default();
        entry.retain(|l| l.split('=').next().unwrap_or("").trim() != key);
        entry.push(line.to_string());
    }
    let mut out = String::new();
    for (s, lines) in sections {
        out.push_str(&s);
        out.push('\n');
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

/// A plain audio declare, as a test that drives the API client by hand sends it.
pub fn declare_request(name: Option<&str>) -> callferry::api::DeclareRequest {
    callferry::api::DeclareRequest {
        kind: "audio".into(),
        language_tag: "en-us".into(),
        vertical: "default".into(),
        audio_transcription_mode: None,
        model: None,
        include_ai_results: false,
        original_filename: name.map(Into::into),
        external_identifier: None,
        metadata: None,
    }
}

pub fn load_config(text: &str) -> Config {
    callferry::config::from_toml_str(text, &BTreeMap::new(), "test").expect("test config")
}

impl TestApp {
    pub async fn start(extra_toml: &str) -> TestApp {
        Self::start_with(
            extra_toml,
            FakeOptions {
                token: TOKEN.into(),
                ..Default::default()
            },
        )
        .await
    }

    pub async fn start_with(extra_toml: &str, opts: FakeOptions) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("rec");
        std::fs::create_dir_all(&rec).unwrap();
        let fake = FakeApi::start(opts).await.unwrap();
        let (shutdown, daemon, handle) = launch(&fake, dir.path(), extra_toml).await;
        TestApp {
            dir,
            rec,
            fake,
            extra_toml: extra_toml.to_string(),
            handle,
            shutdown,
            daemon: Some(daemon),
        }
    }

    pub fn config(&self) -> Config {
        load_config(&config_text(
            &self.fake.base_url(),
            self.dir.path(),
            &self.extra_toml,
        ))
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("state/queue.db")
    }

    /// Graceful stop (as SIGTERM).
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(d) = self.daemon.take() {
            d.await.unwrap().expect("daemon stopped with an error");
        }
    }

    /// Simulated crash: the daemon's task is dropped wherever it is, with no cleanup of its own.
    pub async fn crash(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.abort();
            let _ = d.await;
        }
    }

    pub async fn restart(&mut self) {
        let (shutdown, daemon, handle) =
            launch(&self.fake, self.dir.path(), &self.extra_toml).await;
        self.shutdown = shutdown;
        self.daemon = Some(daemon);
        self.handle = handle;
    }

    /// Delivers a finished file the way rsync/scp do: temporary name, then rename.
    pub fn drop_file(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let dest = self.rec.join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        let tmp = dest.with_file_name(format!(
            ".{}.part",
            dest.file_name().unwrap().to_string_lossy()
        ));
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, &dest).unwrap();
        dest
    }

    pub async fn jobs(&self) -> Vec<Job> {
        self.handle.queue.list(None, 10_000).await.unwrap()
    }

    pub async fn job_for(&self, path: &Path) -> Option<Job> {
        self.jobs()
            .await
            .into_iter()
            .find(|j| Path::new(&j.path) == path)
    }

    pub async fn wait_state(&self, path: &Path, state: &str) -> Job {
        poll_for(&format!("{} to be {state}", path.display()), || async {
            self.job_for(path)
                .await
                .filter(|j| j.state.public().as_str() == state)
        })
        .await
    }

    /// The fake's record of the interaction a job was uploaded on.
    pub fn interaction(&self, id: &str) -> InteractionRecord {
        self.fake
            .interactions()
            .into_iter()
            .find(|i| i.id == id)
            .unwrap_or_else(|| panic!("the fake has no interaction {id}"))
    }

    /// Asserts the fake received exactly these bytes, once, under the right names.
    pub fn assert_uploaded_once(&self, job: &Job, bytes: &[u8]) {
        let iid = job
            .interaction_id
            .as_deref()
            .expect("job has an interaction id");
        let rec = self.interaction(iid);
        let stored: Vec<_> = rec.uploads.iter().filter(|u| u.stored).collect();
        assert_eq!(
            stored.len(),
            1,
            "exactly one stored upload for {iid}: {:?}",
            rec.uploads
        );
        let name = Path::new(&job.path)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert_eq!(
            stored[0].field_name, name,
            "form field name is the file's name"
        );
        assert_eq!(stored[0].filename.as_deref(), Some(name.as_str()));
        assert_eq!(stored[0].size, bytes.len() as u64);
        assert_eq!(stored[0].sha256, sha256(bytes), "bytes received intact");
        let same_file: Vec<_> = self
            .fake
            .interactions()
            .into_iter()
            .filter(|i| i.uploads.iter().any(|u| u.stored && u.field_name == name))
            .collect();
        assert_eq!(
            same_file.len(),
            1,
            "{name} stored on exactly one interaction"
        );
    }
}

async fn launch(
    fake: &FakeApi,
    dir: &Path,
    extra: &str,
) -> (CancellationToken, JoinHandle<Result<(), AppError>>, Handle) {
    let started = Instant::now();
    loop {
        let cfg = load_config(&config_text(&fake.base_url(), dir, extra));
        let shutdown = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let daemon = tokio::spawn(app::run(cfg, shutdown.clone(), Some(tx)));
        match tokio::time::timeout(DEADLINE, rx).await {
            Ok(Ok(handle)) => return (shutdown, daemon, handle),
            _ => match daemon.await {
                // The daemon's lock is a flock, shared by every copy of its descriptor: a
                // parallel test that forks a child (to exec `callferry`) in the moment this test's
                // previous daemon held the lock gives the child a copy until it execs. Under load
                // that moment can outlast the stop; the lock is then only briefly still held.
                Ok(Err(AppError::Queue(callferry::queue::QueueError::Locked(_))))
                    if started.elapsed() < DEADLINE =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                r => panic!("daemon did not start: {r:?}"),
            },
        }
    }
}

/// A second connection to the database, as the CLI (another process) would open it.
pub async fn open_queue(path: &Path) -> Queue {
    Queue::open(path, OpenMode::Existing).await.unwrap()
}

/// The status code `/healthz` at `addr` answers, or None when it does not answer within 5 s.
pub async fn healthz(addr: std::net::SocketAddr) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        text.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
}

/// Log lines of the daemon at its default level (`info`), for counting. Installed as the default
/// subscriber of the test's thread, so the test must run the daemon on a current-thread runtime
/// (`#[tokio::test]`): every task it spawns then logs here, and no other test's lines do.
#[derive(Clone, Default)]
pub struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

pub struct LogWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> LogWriter {
        LogWriter(self.0.clone())
    }
}

impl Logs {
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let sub = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "callferry=info,callferry_fake=off",
            ))
            .finish();
        tracing::subscriber::set_default(sub)
    }

    pub fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Lines at `level` ("INFO", "WARN", ...) that contain `text`.
    pub fn count(&self, level: &str, text: &str) -> usize {
        let level = format!(" {level} ");
        self.lines()
            .iter()
            .filter(|l| l.contains(&level) && l.contains(text))
            .count()
    }

    /// Lines at WARN or ERROR.
    pub fn warnings(&self) -> usize {
        self.count("WARN", "") + self.count("ERROR", "")
    }
}

/// The declare bodies the fake received for recordings named `name` (its own records).
pub fn declare_body_of(app: &TestApp, name: &str) -> Vec<serde_json::Value> {
    app.fake
        .interactions()
        .into_iter()
        .filter(|i| i.declare_body["originalFilename"] == name)
        .map(|i| i.declare_body)
        .collect()
}
