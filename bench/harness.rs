//! The pieces every scenario uses: the fake and the daemon as child processes, generated configs,
//! test files, and the kernel's view of a process (CPU time, peak RSS).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use callferry_fake::{Counters, InteractionRecord};

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

/// `callferry fake-api` as a child process, driven over `/_fake`.
pub struct Fake {
    child: Child,
    pub base: String,
    ctl: String,
    http: reqwest::Client,
    /// With HTTPS: the CA (PEM file) the fake made at start, for clients to trust.
    pub ca: Option<PathBuf>,
}

impl Fake {
    pub async fn start(exe: &Path, log: &Path) -> Result<Fake> {
        Self::start_with(exe, log, None).await
    }

    /// With `ca_out`, the fake serves HTTPS with a certificate it makes at start, and writes the
    /// CA that signed it there.
    pub async fn start_with(exe: &Path, log: &Path, ca_out: Option<&Path>) -> Result<Fake> {
        let port = free_port()?;
        let mut cmd = Command::new(exe);
        cmd.args(["fake-api", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--token", TOKEN, "--processing-time", "1h"]);
        if let Some(ca) = ca_out {
            let _ = std::fs::remove_file(ca);
            cmd.arg("--tls-ca-out").arg(ca);
        }
        let mut child = cmd
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log)?)
            .spawn()
            .with_context(|| format!("cannot start {} fake-api", exe.display()))?;
        let scheme = if ca_out.is_some() { "https" } else { "http" };
        let mut http = reqwest::Client::builder().no_proxy();
        if let Some(ca) = ca_out {
            let pem = poll(
                "the fake's CA file",
                Duration::from_secs(20),
                Duration::from_millis(20),
                || {
                    let exited = child.try_wait().ok().flatten();
                    async move {
                        if let Some(st) = exited {
                            bail!("the fake exited ({st}): {}", tail(log, 2000));
                        }
                        Ok(std::fs::read(ca).ok())
                    }
                },
            )
            .await?;
            http = http
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
        }
        let fake = Fake {
            child,
            base: format!("{scheme}://127.0.0.1:{port}/v1"),
            ctl: format!("{scheme}://127.0.0.1:{port}/_fake"),
            http: http.build()?,
            ca: ca_out.map(Path::to_path_buf),
        };
        poll(
            "the fake to listen",
            Duration::from_secs(20),
            Duration::from_millis(20),
            || async { Ok(fake.counters().await.ok()) },
        )
        .await?;
        Ok(fake)
    }

    pub async fn counters(&self) -> Result<Counters> {
        Ok(self
            .http
            .get(format!("{}/counters", self.ctl))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    pub async fn interactions(&self) -> Result<Vec<InteractionRecord>> {
        Ok(self
            .http
            .get(format!("{}/interactions", self.ctl))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    pub async fn set_latency(&self, ms: u64) -> Result<()> {
        self.http
            .post(format!("{}/latency", self.ctl))
            .json(&serde_json::json!({ "ms": ms }))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Declares one interaction (for the `curl -F` baselines).
    pub async fn declare(&self, name: &str) -> Result<String> {
        let v: serde_json::Value = self
            .http
            .post(format!("{}/interactions", self.base))
            .header("X-API-Token", TOKEN)
            .json(&serde_json::json!({"type": "audio", "languageTag": "en-us",
                "vertical": "default", "originalFilename": name}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        v["interactionIdentifier"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("declare gave no id"))
    }

    /// Waits until `n` uploads are stored in total.
    pub async fn wait_stored(&self, n: u64, deadline: Duration) -> Result<Counters> {
        poll(
            &format!("{n} uploads stored at the fake"),
            deadline,
            Duration::from_millis(20),
            || async {
                let c = self.counters().await?;
                Ok((c.uploads_stored >= n).then_some(c))
            },
        )
        .await
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

pub fn tail(path: &Path, n: usize) -> String {
    let t = std::fs::read_to_string(path).unwrap_or_default();
    let start = t.len().saturating_sub(n);
    let start = (start..t.len())
        .find(|i| t.is_char_boundary(*i))
        .unwrap_or(t.len());
    t[start..].to_string()
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

/// Peak resident set (VmHWM) of a live process, in KiB.
pub fn vm_hwm_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmHWM for {pid}"))
}

/// CPU time of a live process, per thread (schedstat: nanoseconds on CPU, times scheduled in).
#[derive(Clone, Debug, Default)]
pub struct Cpu {
    pub threads: std::collections::HashMap<String, (u64, u64)>,
}

impl Cpu {
    /// CPU nanoseconds and wake-ups between `self` (earlier) and `later`, over the threads alive at
    /// `later` (a thread that exited in between had finished its work before; one that started
    /// counts whole).
    pub fn since(&self, later: &Cpu) -> (u64, u64) {
        let mut ns = 0;
        let mut switches = 0;
        for (tid, (n, s)) in &later.threads {
            let (n0, s0) = self.threads.get(tid).copied().unwrap_or((0, 0));
            ns += n.saturating_sub(n0);
            switches += s.saturating_sub(s0);
        }
        (ns, switches)
    }
}

pub fn cpu(pid: u32) -> Result<Cpu> {
    let mut threads = std::collections::HashMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let t = t?;
        if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
            let f: Vec<u64> = s
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            threads.insert(
                t.file_name().to_string_lossy().to_string(),
                (
                    f.first().copied().unwrap_or(0),
                    f.get(2).copied().unwrap_or(0),
                ),
            );
        }
    }
    Ok(Cpu { threads })
}

/// A pseudo-random block (xorshift), so nothing on the path can compress it.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `n` recordings of `size` bytes named `{prefix}{i:06}.wav` into `dir` (spread over
/// `per_dir`-sized subfolders when given), with an mtime an hour ago: a backlog, complete at once.
pub fn make_files(
    dir: &Path,
    n: usize,
    size: usize,
    prefix: &str,
    per_dir: Option<usize>,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let block = noise(size.min(1 << 20), 7);
    let old = SystemTime::now() - Duration::from_secs(3600);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let folder = match per_dir {
            Some(k) => dir.join(format!("d{:04}", i / k)),
            None => dir.to_path_buf(),
        };
        if per_dir.is_some() && i % per_dir.unwrap_or(1) == 0 {
            std::fs::create_dir_all(&folder)?;
        }
        let path = folder.join(format!("{prefix}{i:06}.wav"));
        write_file(&path, size, &block, i as u64)?;
        File::options()
            .write(true)
            .open(&path)?
            .set_times(std::fs::FileTimes::new().set_modified(old))?;
        out.push(path);
    }
    Ok(out)
}

/// A canonical 44-byte WAV header (8 kHz, 16-bit mono PCM) whose sizes agree with a file of
/// `size` bytes, as a recorder leaves it once the call is over.
fn wav_header(size: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(b"RIFF");
    h.extend_from_slice(&(size as u32 - 8).to_le_bytes());
    h.extend_from_slice(b"WAVEfmt ");
    h.extend_from_slice(&16u32.to_le_bytes());
    h.extend_from_slice(&[1, 0, 1, 0, 0x40, 0x1F, 0, 0, 0x80, 0x3E, 0, 0, 2, 0, 16, 0]);
    h.extend_from_slice(b"data");
    h.extend_from_slice(&(size as u32 - 44).to_le_bytes());
    h
}

/// A complete WAV of `size` bytes: header, an 8-byte serial (so every file differs), then the block
/// repeated as "audio".
pub fn write_file(path: &Path, size: usize, block: &[u8], serial: u64) -> Result<()> {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut head = wav_header(size.max(52));
    head.extend_from_slice(&serial.to_le_bytes());
    let mut left = size.max(52);
    f.write_all(&head)?;
    left -= head.len();
    while left > 0 {
        let k = left.min(block.len());
        f.write_all(&block[..k])?;
        left -= k;
    }
    f.flush()?;
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = std::io::Read::read(&mut f, &mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Checks the fake received each file exactly once, whole, under its own name: one declare, one
/// stored upload, the right size (and, when `check_hash`, the right SHA-256).
pub fn check_exactly_once(
    recs: &[InteractionRecord],
    files: &[PathBuf],
    check_hash: bool,
) -> Result<()> {
    use std::collections::HashMap;
    let mut by_name: HashMap<String, &InteractionRecord> = HashMap::new();
    for r in recs {
        let name = r.declare_body["originalFilename"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if by_name.insert(name.clone(), r).is_some() {
            bail!("{name} was declared twice");
        }
    }
    if recs.len() != files.len() {
        bail!("{} interactions for {} files", recs.len(), files.len());
    }
    for f in files {
        let name = f
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let r = by_name
            .get(&name)
            .ok_or_else(|| anyhow!("{name} was never declared"))?;
        let stored: Vec<_> = r.uploads.iter().filter(|u| u.stored).collect();
        if stored.len() != 1 {
            bail!("{name}: {} stored uploads", stored.len());
        }
        let u = stored[0];
        let size = std::fs::metadata(f)?.len();
        if u.size != size || u.field_name != name {
            bail!(
                "{name}: stored {} bytes as field {:?}, expected {size} as {name:?}",
                u.size,
                u.field_name
            );
        }
        if check_hash && u.sha256 != sha256_file(f)? {
            bail!("{name}: content differs");
        }
    }
    Ok(())
}

/// First declare → last stored, in seconds, as the fake saw it.
pub fn span_s(recs: &[InteractionRecord]) -> f64 {
    let t0 = recs.iter().map(|r| r.declared_at_ms).min().unwrap_or(0);
    let t1 = recs
        .iter()
        .filter_map(|r| r.stored_at_ms)
        .max()
        .unwrap_or(t0);
    ((t1.saturating_sub(t0)) as f64 / 1000.0).max(0.001)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `curl -F` of one file to the fake: declare, then time the upload. Bytes per second.
pub async fn curl_upload(fake: &Fake, file: &Path) -> Result<f64> {
    let name = file
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let id = fake.declare(&name).await?;
    let url = format!("{}/interactions/{id}/upload", fake.base);
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}"])
        .args(["-H", &format!("X-API-Token: {TOKEN}")])
        .arg("-F")
        .arg(format!(
            "{name}=@{};type=application/octet-stream",
            file.display()
        ))
        .arg(&url)
        .output()
        .context("cannot run curl")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut it = text.split_whitespace();
    let code = it.next().unwrap_or("");
    let secs: f64 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    if code != "201" || secs <= 0.0 {
        bail!(
            "curl upload answered {text:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(std::fs::metadata(file)?.len() as f64 / secs)
}

pub fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A process's CPU and context switches so far, for figures per file or per GiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcCpu {
    /// User and kernel seconds of the whole process, exited threads included (`/proc/<pid>/stat`,
    /// in clock ticks: used for the split).
    pub user_s: f64,
    pub sys_s: f64,
    /// Nanoseconds on CPU, summed over the live threads' `schedstat` (exact).
    pub ns: u64,
    /// Voluntary and involuntary context switches, summed over the live threads.
    pub switches: u64,
}

impl ProcCpu {
    pub fn of(pid: u32) -> Result<ProcCpu> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let user_s = f.get(11).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0) / hz;
        let sys_s = f.get(12).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0) / hz;
        let mut ns = 0;
        let mut switches = 0;
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let t = t?.path();
            if let Ok(s) = std::fs::read_to_string(t.join("schedstat")) {
                ns += s
                    .split_whitespace()
                    .next()
                    .and_then(|x| x.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            if let Ok(s) = std::fs::read_to_string(t.join("status")) {
                for l in s.lines() {
                    if let Some(v) = l
                        .strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                    {
                        switches += v.trim().parse::<u64>().unwrap_or(0);
                    }
                }
            }
        }
        Ok(ProcCpu {
            user_s,
            sys_s,
            ns,
            switches,
        })
    }

    /// What was spent between `self` (earlier) and `later`. Threads that exited in between lose
    /// their schedstat share; the daemon's threads live for its whole run.
    pub fn until(&self, later: &ProcCpu) -> ProcCpu {
        ProcCpu {
            user_s: (later.user_s - self.user_s).max(0.0),
            sys_s: (later.sys_s - self.sys_s).max(0.0),
            ns: later.ns.saturating_sub(self.ns),
            switches: later.switches.saturating_sub(self.switches),
        }
    }

    /// CPU seconds: schedstat's exact sum when there is one, else the ticks.
    pub fn secs(&self) -> f64 {
        if self.ns > 0 {
            self.ns as f64 / 1e9
        } else {
            self.user_s + self.sys_s
        }
    }

    /// The kernel's share of the ticks (0 when there were none).
    pub fn sys_share(&self) -> f64 {
        let t = self.user_s + self.sys_s;
        if t > 0.0 { self.sys_s / t } else { 0.0 }
    }
}

/// What a child process did: its output and its CPU (its own and its reaped children's).
pub struct Measured {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
    pub user_s: f64,
    pub sys_s: f64,
}

impl Measured {
    pub fn secs(&self) -> f64 {
        self.user_s + self.sys_s
    }

    pub fn sys_share(&self) -> f64 {
        if self.secs() > 0.0 {
            self.sys_s / self.secs()
        } else {
            0.0
        }
    }
}

/// Runs `cmd` to its end and takes its CPU from `wait4` (a shell loop's curls included: the kernel
/// adds each reaped child's usage to its parent's).
pub fn run_measured(cmd: &mut Command) -> Result<Measured> {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let mut stdout = Vec::new();
    out.read_to_end(&mut stdout)?;
    let stderr = reader.join().unwrap_or_default();
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 on our own child, which `Child` has not reaped.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    if r < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Measured {
        ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        user_s: tv(ru.ru_utime),
        sys_s: tv(ru.ru_stime),
    })
}

/// `curl -F` (with `--cacert` when the fake serves HTTPS) of one file: declare, then time the
/// upload. Bytes per second, and curl's run (its CPU).
pub async fn curl_upload_measured(fake: &Fake, file: &Path) -> Result<(f64, Measured)> {
    let name = file
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let id = fake.declare(&name).await?;
    let url = format!("{}/interactions/{id}/upload", fake.base);
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}"])
        .args(["-H", &format!("X-API-Token: {TOKEN}")]);
    if let Some(ca) = &fake.ca {
        cmd.arg("--cacert").arg(ca);
    }
    cmd.arg("-F")
        .arg(format!(
            "{name}=@{};type=application/octet-stream",
            file.display()
        ))
        .arg(&url);
    let m = tokio::task::block_in_place(|| run_measured(&mut cmd)).context("cannot run curl")?;
    let mut it = m.stdout.split_whitespace();
    let code = it.next().unwrap_or("");
    let secs: f64 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    if code != "201" || secs <= 0.0 {
        bail!("curl upload answered {:?}: {}", m.stdout, m.stderr);
    }
    Ok((std::fs::metadata(file)?.len() as f64 / secs, m))
}
