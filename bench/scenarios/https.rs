//! Scenarios 8 (HTTPS) and 9 (CPU per call): what a recorder host pays for each
//! upload. Both run the daemon over files that appear while it runs (hard links into its watched
//! folder, so every figure includes noticing the file), and take its CPU from the kernel
//! (`ProcCpu`: schedstat for the total, `/proc/<pid>/stat` for the user/kernel split, each
//! thread's `status` for context switches) from just before the first file appears to the moment
//! the queue has recorded the last one as uploaded.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use callferry_fake::{Counters, InteractionRecord};

use super::{MIB, big_file, fresh, logged_upload_seconds, mbps, pct};
use crate::harness::{
    self, Daemon, DaemonSetup, Fake, Measured, ProcCpu, TOKEN, check_exactly_once, make_files,
    span_s,
};
use crate::peers::Peer;
use crate::{Ctx, Mode, Report};

const GIB: f64 = (1u64 << 30) as f64;
/// A 5-minute call at 8 kHz, 16-bit mono: 4,800,000 bytes of samples and the 44-byte header.
const CALL_WAV: usize = 4_800_044;

/// Connections and TLS handshakes the fake saw between two counter readings.
#[derive(Clone, Copy, Debug, Default)]
struct Conns {
    connections: u64,
    full: u64,
    resumed: u64,
}

impl Conns {
    fn between(a: &Counters, b: &Counters) -> Conns {
        Conns {
            connections: b.connections - a.connections,
            full: b.tls_full_handshakes - a.tls_full_handshakes,
            resumed: b.tls_resumed_handshakes - a.tls_resumed_handshakes,
        }
    }

    fn per_file(&self, n: usize, tls: bool) -> String {
        let n = n.max(1) as f64;
        if tls {
            format!(
                "{} connections, {} full + {} resumed handshakes = {:.2} handshakes per file",
                self.connections,
                self.full,
                self.resumed,
                (self.full + self.resumed) as f64 / n
            )
        } else {
            format!(
                "{} connections = {:.2} per file",
                self.connections,
                self.connections as f64 / n
            )
        }
    }
}

/// What one client did with one set of files.
struct ClientRun {
    recs: Vec<InteractionRecord>,
    /// CPU seconds, and the kernel's share of them.
    cpu_s: f64,
    sys_share: f64,
    switches: Option<u64>,
    conns: Conns,
    /// Upload seconds of one large file as the client timed it (callferry's log, curl's
    /// `time_total`); `None` for a set of files (the fake's span is used).
    upload_s: Option<f64>,
}

impl ClientRun {
    fn bytes(&self) -> u64 {
        self.recs
            .iter()
            .flat_map(|r| r.uploads.iter().filter(|u| u.stored).map(|u| u.size))
            .sum()
    }

    fn rate(&self) -> f64 {
        let secs = self.upload_s.unwrap_or_else(|| span_s(&self.recs));
        self.bytes() as f64 / secs
    }

    fn files_per_s(&self) -> f64 {
        self.recs.len() as f64 / span_s(&self.recs)
    }

    fn cpu_per_gib(&self) -> f64 {
        self.cpu_s / (self.bytes().max(1) as f64 / GIB)
    }

    fn cpu_text(&self) -> String {
        format!(
            "{:.2} s/GiB ({:.0} % kernel)",
            self.cpu_per_gib(),
            self.sys_share * 100.0
        )
    }
}

/// The fake's interactions that are not in `before` (the fake is shared by every client).
async fn new_records(fake: &Fake, before: &HashSet<String>) -> Result<Vec<InteractionRecord>> {
    Ok(fake
        .interactions()
        .await?
        .into_iter()
        .filter(|r| !before.contains(&r.id))
        .collect())
}

async fn ids(fake: &Fake) -> Result<HashSet<String>> {
    Ok(fake
        .interactions()
        .await?
        .into_iter()
        .map(|r| r.id)
        .collect())
}

/// The daemon, started on an empty folder; once it runs, `files` appear in it (hard links) and it
/// uploads them. CPU from just before they appear to the commit of the last `uploaded`.
async fn daemon_over(
    ctx: &Ctx,
    fake: &Fake,
    dir: &Path,
    files: &[PathBuf],
    workers: Option<usize>,
) -> Result<ClientRun> {
    let watch = fresh(&dir.join("rec"))?;
    let mut setup = DaemonSetup::new(&watch, &dir.join("db/queue.db"));
    setup.workers = workers;
    setup.ca_file = fake.ca.clone();
    let cfg = dir.join("callferry.toml");
    setup.write_config(&fake.base, &cfg)?;
    let mut d = Daemon::start(&ctx.exe, &cfg, &dir.join("daemon.log"))?;
    d.wait_running(Duration::from_secs(60)).await?;
    // Start-up's own work (migrations, the first scan, pre-zeroing the WAL) is not a call's.
    tokio::time::sleep(Duration::from_millis(ctx.mode.pick(1000, 1000, 200))).await;
    let before = ids(fake).await?;
    let c0 = fake.counters().await?;
    let p0 = ProcCpu::of(d.pid())?;
    let mut linked = Vec::with_capacity(files.len());
    for f in files {
        let to = watch.join(f.file_name().unwrap_or_default());
        std::fs::hard_link(f, &to)?;
        linked.push(to);
    }
    let n = files.len() as u64;
    fake.wait_stored(c0.uploads_stored + n, Duration::from_secs(900))
        .await?;
    harness::poll(
        "the daemon to record every upload",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || async {
            let (v, _) = harness::status(&ctx.exe, &cfg)?;
            Ok((v["counts"]["uploaded"].as_u64() == Some(n)).then_some(()))
        },
    )
    .await?;
    let p1 = ProcCpu::of(d.pid())?;
    let c1 = fake.counters().await?;
    let upload_s = if files.len() == 1 {
        logged_upload_seconds(&d.log)
    } else {
        None
    };
    d.stop()?;
    let recs = new_records(fake, &before).await?;
    check_exactly_once(&recs, &linked, ctx.mode == Mode::Smoke)?;
    for l in &linked {
        let _ = std::fs::remove_file(l);
    }
    let cpu = p0.until(&p1);
    Ok(ClientRun {
        recs,
        cpu_s: cpu.secs(),
        sys_share: cpu.sys_share(),
        switches: Some(cpu.switches),
        conns: Conns::between(&c0, &c1),
        upload_s,
    })
}

/// `curl -F --cacert` of one file (the bench declares it).
async fn curl_one(fake: &Fake, file: &Path) -> Result<ClientRun> {
    let before = ids(fake).await?;
    let c0 = fake.counters().await?;
    let (rate, m) = harness::curl_upload_measured(fake, file).await?;
    let c1 = fake.counters().await?;
    let recs = new_records(fake, &before).await?;
    check_exactly_once(&recs, std::slice::from_ref(&file.to_path_buf()), false)?;
    let size = std::fs::metadata(file)?.len() as f64;
    Ok(ClientRun {
        recs,
        cpu_s: m.secs(),
        sys_share: m.sys_share(),
        switches: None,
        conns: Conns::between(&c0, &c1),
        upload_s: Some(size / rate),
    })
}

/// A peer over every `.wav` in `folder`, against the shared fake.
async fn peer_over(
    ctx: &Ctx,
    p: Peer,
    fake: &Fake,
    folder: &Path,
    files: &[PathBuf],
) -> Result<ClientRun> {
    let peers = ctx
        .peers
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no peers"))?;
    let before = ids(fake).await?;
    let c0 = fake.counters().await?;
    let m: Measured = tokio::task::block_in_place(|| {
        peers.run_measured(p, &fake.base, TOKEN, folder, fake.ca.as_deref())
    })?;
    let c1 = fake.counters().await?;
    let recs = new_records(fake, &before).await?;
    check_exactly_once(&recs, files, false)?;
    let start = match p {
        Peer::Aiohttp(_) | Peer::SdkLoop => peers.python_start_cpu().unwrap_or(0.0),
        Peer::CurlLoop => 0.0,
    };
    let cpu_s = (m.secs() - start).max(0.0);
    Ok(ClientRun {
        recs,
        cpu_s,
        sys_share: m.sys_share(),
        switches: None,
        conns: Conns::between(&c0, &c1),
        upload_s: None,
    })
}

// ---------------------------------------------------------------------------------------------
// 8. HTTPS

pub async fn https(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    let dir = fresh(&ctx.work.join("runs/https"))?;
    let fake = Fake::start_with(&ctx.exe, &dir.join("fake.log"), Some(&dir.join("ca.pem"))).await?;
    if !fake.base.starts_with("https://") {
        bail!("the fake does not serve HTTPS: {}", fake.base);
    }
    let peers = ctx.peers.as_ref();
    let curl = peers.is_some_and(|p| p.curl);
    let aiohttp = peers.is_some_and(|p| p.available(Peer::Aiohttp(8)));

    https_large(ctx, rep, &fake, &dir, curl, aiohttp).await?;
    https_many(ctx, rep, &fake, &dir, curl, aiohttp).await
}

/// One large file: throughput and client CPU per GiB, next to curl (and aiohttp).
async fn https_large(
    ctx: &Ctx,
    rep: &mut Report,
    fake: &Fake,
    dir: &Path,
    curl: bool,
    aiohttp: bool,
) -> Result<()> {
    let mib = ctx.mode.pick(1024, 256, 8);
    let file = big_file(ctx, mib)?;
    let cf = daemon_over(
        ctx,
        fake,
        &fresh(&dir.join("large"))?,
        std::slice::from_ref(&file),
        None,
    )
    .await?;
    let cu = if curl {
        Some(curl_one(fake, &file).await?)
    } else {
        None
    };
    let folder = file.parent().unwrap_or(Path::new("/")).to_path_buf();
    let ai = if aiohttp {
        Some(
            peer_over(
                ctx,
                Peer::Aiohttp(1),
                fake,
                &folder,
                std::slice::from_ref(&file),
            )
            .await?,
        )
    } else {
        None
    };
    let mut value = format!("callferry {}", mbps(cf.rate()));
    let mut met = None;
    if let Some(c) = &cu {
        value.push_str(&format!(
            " vs curl {} = {}",
            mbps(c.rate()),
            pct(cf.rate() / c.rate())
        ));
        met = Some(cf.rate() >= 0.9 * c.rate());
    }
    if let Some(a) = &ai {
        value.push_str(&format!("; aiohttp {}", mbps(a.rate())));
    }
    rep.row(
        "8",
        format!("HTTPS, one {mib} MiB file: throughput"),
        value,
        "≥ 90 % of curl",
        met,
    );
    let mut value = format!("callferry {}", cf.cpu_text());
    let mut met = None;
    if let Some(c) = &cu {
        value.push_str(&format!(
            ", curl {:.2} s/GiB: callferry = {:.2}× curl",
            c.cpu_per_gib(),
            cf.cpu_per_gib() / c.cpu_per_gib()
        ));
        met = Some(cf.cpu_per_gib() <= 1.2 * c.cpu_per_gib());
    }
    if let Some(a) = &ai {
        value.push_str(&format!(
            "; aiohttp {:.2} s/GiB (interpreter start excluded)",
            a.cpu_per_gib()
        ));
    }
    rep.row(
        "8",
        format!("HTTPS, one {mib} MiB file: client CPU per GiB"),
        value,
        "≤ 1.2× curl",
        met,
    );

    Ok(())
}

/// Many 1 MiB files: files per second, client CPU per GiB, and the connections and TLS handshakes
/// the fake saw, which must not grow with the files.
async fn https_many(
    ctx: &Ctx,
    rep: &mut Report,
    fake: &Fake,
    dir: &Path,
    curl: bool,
    aiohttp: bool,
) -> Result<()> {
    let n = ctx.mode.pick(200, 200, 8);
    let staged = ctx.work.join("s8/files");
    let _ = std::fs::remove_dir_all(&staged);
    let files = make_files(&staged, n, MIB, "tls-", None)?;
    let cf = daemon_over(ctx, fake, &fresh(&dir.join("small"))?, &files, None).await?;
    let workers = 4;
    let cu = if curl {
        Some(peer_over(ctx, Peer::CurlLoop, fake, &staged, &files).await?)
    } else {
        None
    };
    let ai = if aiohttp {
        Some(peer_over(ctx, Peer::Aiohttp(8), fake, &staged, &files).await?)
    } else {
        None
    };
    let mut speed = format!("callferry (4 workers) {:.0} files/s", cf.files_per_s());
    let mut cpu = format!("callferry {}", cf.cpu_text());
    let mut conns = format!("callferry: {}", cf.conns.per_file(n, true));
    for (label, r) in [("curl loop", &cu), ("aiohttp (8)", &ai)] {
        if let Some(r) = r {
            speed.push_str(&format!("; {label} {:.0} files/s", r.files_per_s()));
            cpu.push_str(&format!("; {label} {:.2} s/GiB", r.cpu_per_gib()));
            conns.push_str(&format!("; {label}: {}", r.conns.per_file(n, true)));
        }
    }
    rep.row(
        "8",
        format!("HTTPS, {n} × 1 MiB: files per second"),
        speed,
        "",
        None,
    );
    rep.row(
        "8",
        format!("HTTPS, {n} × 1 MiB: client CPU per GiB"),
        cpu,
        "",
        None,
    );
    // Warm-up: a connection per worker, made once.
    let handshakes = cf.conns.full + cf.conns.resumed;
    rep.row(
        "8",
        format!("HTTPS, {n} × 1 MiB: connections and TLS handshakes at the fake"),
        conns,
        "callferry: ~0 per file after warm-up (≤ 1 per worker)",
        Some(handshakes <= workers as u64),
    );
    if handshakes == 0 {
        bail!("the daemon made no TLS handshake: is the fake serving HTTPS?");
    }
    let _ = std::fs::remove_dir_all(&staged);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 9. CPU per call

pub async fn cpu_per_call(ctx: &Ctx, rep: &mut Report) -> Result<()> {
    let cases: [(&str, usize, usize, bool); 3] = [
        ("1 MiB", MIB, ctx.mode.pick(1000, 300, 8), false),
        (
            "5-minute 8 kHz WAV (4.8 MB)",
            CALL_WAV,
            ctx.mode.pick(200, 100, 4),
            false,
        ),
        ("1 MiB, HTTPS", MIB, ctx.mode.pick(1000, 300, 8), true),
    ];
    for (label, size, n, tls) in cases {
        let dir = fresh(&ctx.work.join(format!("runs/cpu-{size}-{tls}")))?;
        let fake = Fake::start_with(
            &ctx.exe,
            &dir.join("fake.log"),
            tls.then(|| dir.join("ca.pem")).as_deref(),
        )
        .await?;
        let staged = ctx.work.join("s9/files");
        let _ = std::fs::remove_dir_all(&staged);
        let files = make_files(&staged, n, size, "call-", None)?;
        let r = daemon_over(ctx, &fake, &fresh(&dir.join("d"))?, &files, None).await?;
        let _ = std::fs::remove_dir_all(&staged);
        let per_ms = r.cpu_s * 1000.0 / n as f64;
        let sw = r.switches.unwrap_or(0) as f64 / n as f64;
        let kernel = r.sys_share;
        let (target, met) = if size == MIB && !tls {
            (
                "≤ 0.39 ms, ≤ 14 switches (half of 0.78 ms, 28)",
                Some(per_ms <= 0.39 && sw <= 14.0),
            )
        } else {
            ("", None)
        };
        rep.row(
            "9",
            format!("daemon CPU per uploaded file, {label} (n = {n}, default workers)"),
            format!(
                "{per_ms:.2} ms (user {:.2}, kernel {:.2}), {sw:.1} context switches",
                per_ms * (1.0 - kernel),
                per_ms * kernel
            ),
            target,
            met,
        );
    }
    Ok(())
}
