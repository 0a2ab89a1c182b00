//! The kernel's view of a process (peak RSS, CPU time per thread, context switches, a child's
//! CPU from `wait4`), the machine's load, and the arithmetic the figures share (span, percentile).

use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};
use callferry_fake::InteractionRecord;

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
