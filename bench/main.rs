//! `callferry-bench`: the project's benchmarks, in one command.
//!
//! Runs the real daemon (`callferry run`) and the project's fake ElevateAI (`callferry fake-api`) as
//! child processes on loopback, drives them with generated configs and files, and prints one table
//! of measurements, targets and ratios against the tools a user would use instead (an SDK-style
//! Python loop, an aiohttp uploader, a curl loop), all measured in the same run on the same machine.
//!
//! ```sh
//! cargo run --release --bin callferry-bench             # the full run (a few minutes)
//! cargo run --release --bin callferry-bench -- --quick  # smaller sizes, shorter windows
//! ```
//! `--smoke` is the CI version (tiny sizes, no Python, no curl): it checks that every scenario
//! works and that every file arrives exactly once, and asserts nothing about speed.

mod harness;
mod peers;
mod scenarios;

use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "callferry-bench",
    about = "callferry's benchmarks: one table, peers side by side"
)]
pub struct Args {
    /// Smaller sizes and shorter windows (about a third of the full run's time).
    #[arg(long)]
    quick: bool,
    /// CI smoke run: tiny sizes, no peers; checks correctness only, never speed.
    #[arg(long, conflicts_with = "quick")]
    smoke: bool,
    /// Only these scenarios (1-9), comma-separated.
    #[arg(long, value_delimiter = ',')]
    only: Vec<u8>,
    /// Skip the Python and curl peers.
    #[arg(long)]
    no_peers: bool,
    /// The callferry binary (default: the one next to this binary).
    #[arg(long)]
    callferry: Option<PathBuf>,
    /// Where to put files, databases and logs (default: a temporary folder, removed afterwards).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Where the Python venv for the peers lives (default: next to this binary).
    #[arg(long)]
    venv: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Full,
    Quick,
    Smoke,
}

impl Mode {
    /// The value for this mode: full, quick, smoke.
    pub fn pick<T>(self, full: T, quick: T, smoke: T) -> T {
        match self {
            Mode::Full => full,
            Mode::Quick => quick,
            Mode::Smoke => smoke,
        }
    }
}

/// One line of the table.
pub struct Row {
    pub scenario: &'static str,
    pub what: String,
    pub value: String,
    pub target: String,
    pub met: Option<bool>,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn row(
        &mut self,
        scenario: &'static str,
        what: impl Into<String>,
        value: impl Into<String>,
        target: impl Into<String>,
        met: Option<bool>,
    ) {
        let r = Row {
            scenario,
            what: what.into(),
            value: value.into(),
            target: target.into(),
            met,
        };
        eprintln!(
            "bench: [{}] {} = {} {}",
            r.scenario,
            r.what,
            r.value,
            if r.target.is_empty() {
                String::new()
            } else {
                format!("(target {})", r.target)
            }
        );
        self.rows.push(r);
    }

    pub fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        eprintln!("bench: note: {s}");
        self.notes.push(s);
    }

    fn markdown(&self, smoke: bool) -> String {
        let mut out =
            String::from("| # | measurement | result | target | met |\n|---|---|---|---|---|\n");
        for r in &self.rows {
            let met = match (r.met, smoke) {
                (_, true) | (None, _) => "",
                (Some(true), _) => "yes",
                (Some(false), _) => "**no**",
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                r.scenario, r.what, r.value, r.target, met
            ));
        }
        out
    }
}

pub struct Ctx {
    pub mode: Mode,
    pub exe: PathBuf,
    pub work: PathBuf,
    pub peers: Option<peers::Peers>,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map(|k| format!("{:.0} GiB", k as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    format!(
        "{} × {cpu}, {mem} RAM, Linux {kernel}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match rt.block_on(run(args)) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("callferry-bench: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let mode = if args.smoke {
        Mode::Smoke
    } else if args.quick {
        Mode::Quick
    } else {
        Mode::Full
    };
    // Without --workdir, the temporary folder lives until the table is printed.
    let (ctx, _tmp) = context(&args, mode)?;
    let started = std::time::Instant::now();
    let load_before = harness::load_avg();
    let mut rep = Report::default();
    let failures = run_scenarios(&ctx, &mut rep, &args.only).await;
    print_table(ctx.mode, &rep, &failures, started, &load_before);
    Ok(failures.is_empty())
}

/// Where the binary, the work folder and the peers are; the temporary folder, when one was made.
fn context(args: &Args, mode: Mode) -> anyhow::Result<(Ctx, Option<tempfile::TempDir>)> {
    let here = std::env::current_exe()?;
    let bindir = here.parent().map(PathBuf::from).unwrap_or_default();
    let exe = args
        .callferry
        .clone()
        .unwrap_or_else(|| bindir.join("callferry"));
    if !exe.exists() {
        anyhow::bail!(
            "{} not found: build it (cargo build --release) or pass --callferry",
            exe.display()
        );
    }
    let mut tmp = None;
    let work = match &args.workdir {
        Some(w) => {
            std::fs::create_dir_all(w)?;
            w.clone()
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("callferry-bench-")
                .tempdir()?;
            let path = t.path().to_path_buf();
            tmp = Some(t);
            path
        }
    };
    let peers = (mode != Mode::Smoke && !args.no_peers).then(|| {
        let venv = args
            .venv
            .clone()
            .unwrap_or_else(|| bindir.join("bench-venv"));
        peers::Peers::prepare(&work.join("peers"), &venv)
    });
    let ctx = Ctx {
        mode,
        exe,
        work,
        peers,
    };
    Ok((ctx, tmp))
}

/// The scenarios asked for, in order; a failed one is reported and the others still run.
async fn run_scenarios(ctx: &Ctx, rep: &mut Report, only: &[u8]) -> Vec<String> {
    let want = |n: u8| only.is_empty() || only.contains(&n);
    let mut failures = Vec::new();
    type Scenario = for<'a> fn(
        &'a Ctx,
        &'a mut Report,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = anyhow::Result<()>> + 'a>,
    >;
    let all: [(u8, &str, Scenario); 9] = [
        (1, "many small files", |c, r| {
            Box::pin(scenarios::many_small(c, r))
        }),
        (2, "one large file", |c, r| Box::pin(scenarios::large(c, r))),
        (3, "backlog", |c, r| Box::pin(scenarios::backlog(c, r))),
        (4, "latency", |c, r| Box::pin(scenarios::latency(c, r))),
        (5, "idle", |c, r| Box::pin(scenarios::idle(c, r))),
        (6, "bandwidth limit", |c, r| {
            Box::pin(scenarios::bandwidth(c, r))
        }),
        (7, "history", |c, r| Box::pin(scenarios::history(c, r))),
        (8, "HTTPS", |c, r| Box::pin(scenarios::https(c, r))),
        (9, "CPU per call", |c, r| {
            Box::pin(scenarios::cpu_per_call(c, r))
        }),
    ];
    for (n, name, f) in all {
        if !want(n) {
            continue;
        }
        eprintln!("bench: scenario {n}: {name} (load {})", harness::load_avg());
        if let Err(e) = f(ctx, rep).await {
            eprintln!("bench: scenario {n} ({name}) FAILED: {e:#}");
            failures.push(format!("scenario {n} ({name}): {e:#}"));
        }
    }
    failures
}

/// What the run prints on stdout: its mode, time and machine, the table, the notes, the failures
/// and, but for the smoke run, how many targets were missed.
fn print_table(
    mode: Mode,
    rep: &Report,
    failures: &[String],
    started: std::time::Instant,
    load_before: &str,
) {
    let mode_s = match mode {
        Mode::Full => "full",
        Mode::Quick => "quick",
        Mode::Smoke => "smoke",
    };
    println!(
        "callferry-bench ({mode_s} run, {:.0} s) on {}; load average before {load_before}, after {}\n",
        started.elapsed().as_secs_f64(),
        machine(),
        harness::load_avg()
    );
    println!("{}", rep.markdown(mode == Mode::Smoke));
    for n in &rep.notes {
        println!("- {n}");
    }
    for f in failures {
        println!("FAILED: {f}");
    }
    if mode != Mode::Smoke {
        let missed = rep.rows.iter().filter(|r| r.met == Some(false)).count();
        println!("\ntargets missed: {missed}");
    }
}
