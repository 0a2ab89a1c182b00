//! Owns `callferry demo`: the whole flow on one machine with nothing set up — the built-in fake
//! ElevateAI on loopback, a temporary watched folder and database, generated recordings (one of
//! them written slowly in place, as a recorder does), and live progress until they are through.
//!
//! Everything it shows goes through the writer it is given: a reader that went away
//! (`callferry demo | head -1`) ends the demo quietly (the error is [`AppError::Output`]), after
//! the daemon and the fake are stopped.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app::{self, AppError};
use crate::queue::{Job, State};
use callferry_fake::{FakeApi, FakeOptions, wav_bytes};

const DEMO_TOKEN: &str = "demo-token-not-secret";

/// The four finished recordings, dropped the way rsync/scp deliver them.
const DROPPED: [&str; 4] = [
    "sales-0001.wav",
    "support-0002.wav",
    "billing-0003.wav",
    "support-0004.wav",
];
/// The fifth, recorded live, in place.
const LIVE: &str = "live-call-0005.wav";
const TOTAL: u64 = DROPPED.len() as u64 + 1;

/// Runs the demo, writing what happens to `out`; the exit code is 0 when every recording was
/// processed.
pub async fn run(out: &mut impl Write) -> Result<i32, AppError> {
    let started = Instant::now();
    let dir =
        tempfile::tempdir().map_err(|e| io("cannot create the demo's temporary folder", e))?;
    std::fs::create_dir_all(dir.path().join("recordings"))
        .map_err(|e| io("cannot create the demo's recordings folder", e))?;
    let fake = start_fake().await?;
    let cfg = demo_config(&fake.base_url(), dir.path())?;
    let shutdown = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let daemon = tokio::spawn(app::run(cfg, shutdown.clone(), Some(tx)));
    let Ok(handle) = rx.await else {
        fake.shutdown().await;
        return match daemon.await {
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => Err(AppError::NotStarted),
            Err(e) => Err(AppError::Task(e)),
        };
    };
    // Whatever `show` ends with (a closed stdout included), the daemon and the fake stop cleanly.
    let shown = show(out, &fake, &handle, dir.path(), started).await;
    shutdown.cancel();
    let stopped = daemon.await;
    fake.shutdown().await;
    let code = shown?;
    stopped??;
    Ok(code)
}

async fn start_fake() -> Result<FakeApi, AppError> {
    let fake = FakeApi::start(FakeOptions {
        token: DEMO_TOKEN.into(),
        processing_time: Duration::from_secs(2),
        ..Default::default()
    })
    .await
    .map_err(|e| io("cannot start the fake API", e))?;
    // One upload is answered by a dropped connection after the service stored it: the retry then
    // gets 409, which callferry counts as uploaded.
    fake.push_fault(
        callferry_fake::Endpoint::Upload,
        callferry_fake::Fault::ResetAfterStore,
    );
    Ok(fake)
}

fn demo_config(base_url: &str, dir: &Path) -> Result<crate::config::Config, AppError> {
    let text = format!(
        r#"
[api]
base_url = "{base_url}"
token = "{DEMO_TOKEN}"
[watch]
paths = ["{rec}"]
settle = "1s"
[queue]
database = "{db}"
[upload]
workers = 4
backoff_initial = "200ms"
backoff_max = "2s"
shutdown_grace = "5s"
[declare]
include_ai_results = true
[results]
enabled = true
output_dir = "{out}"
poll_interval = "500ms"
format = "text"
"#,
        rec = dir.join("recordings").display(),
        db = dir.join("state/queue.db").display(),
        out = dir.join("results").display(),
    );
    Ok(crate::config::from_toml_str(
        &text,
        &Default::default(),
        "demo",
    )?)
}

/// An I/O error of the demo's own, with what it was doing.
fn io(what: impl Into<String>, source: std::io::Error) -> AppError {
    AppError::Io {
        what: what.into(),
        source,
    }
}

/// One line of the demo's output. A reader that went away is [`AppError::Output`].
fn say(out: &mut impl Write, line: impl std::fmt::Display) -> Result<(), AppError> {
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(AppError::Output)
}

/// Everything the demo shows, from the banner to the transcript; returns the exit code.
async fn show(
    out: &mut impl Write,
    fake: &FakeApi,
    handle: &app::Handle,
    dir: &Path,
    started: Instant,
) -> Result<i32, AppError> {
    let rec = dir.join("recordings");
    say(out, "callferry demo")?;
    say(out, format!("  fake ElevateAI  {}", fake.base_url()))?;
    say(out, format!("  watched folder  {}", rec.display()))?;
    say(out, "")?;
    let writer = drop_recordings(out, &rec)?;
    follow_progress(out, handle, &writer).await?;
    let _ = writer.await;
    say(out, "")?;
    let jobs = handle.queue.list(None, 100).await?;
    show_jobs(out, &jobs)?;
    let fc = fake.counters();
    say(out, "")?;
    say(
        out,
        format_args!(
            "  fake API saw: {} declares, {} uploads stored, {} answered 409, {} injected faults",
            fc.declares, fc.uploads_stored, fc.uploads_conflict, fc.faults_injected
        ),
    )?;
    let done = jobs.iter().filter(|j| j.state == State::Processed).count() as u64;
    say(
        out,
        format_args!(
            "  {done}/{TOTAL} recordings uploaded exactly once and transcribed in {:.1}s",
            started.elapsed().as_secs_f64()
        ),
    )?;
    show_transcript(out, &dir.join("results"), &jobs)?;
    Ok(if done == TOTAL { 0 } else { 1 })
}

/// Four finished recordings arrive under a temporary name and are renamed into place; a fifth is
/// recorded live, in place, over ~3 seconds, by the returned task.
fn drop_recordings(
    out: &mut impl Write,
    rec: &Path,
) -> Result<JoinHandle<std::io::Result<()>>, AppError> {
    for (i, name) in DROPPED.iter().enumerate() {
        let tmp = rec.join(format!(".{name}.part"));
        std::fs::write(&tmp, wav_bytes(2.0 + i as f64, 440.0 + 110.0 * i as f64))
            .and_then(|_| std::fs::rename(&tmp, rec.join(name)))
            .map_err(|e| io(format!("cannot drop {name} into {}", rec.display()), e))?;
        say(out, format_args!("  dropped    {name}"))?;
    }
    let live = rec.join(LIVE);
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let body = wav_bytes(6.0, 300.0);
        let mut f = std::fs::File::create(&live)?;
        // Recorders write a placeholder header first and the audio as the call goes on.
        for chunk in body.chunks(body.len() / 12 + 1) {
            f.write_all(chunk)?;
            f.flush()?;
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(())
    });
    say(
        out,
        format_args!("  recording  {LIVE} (written in place for ~3s)"),
    )?;
    say(out, "")?;
    Ok(writer)
}

/// A line of counts each time they change, until every recording is through (or a minute).
async fn follow_progress<T>(
    out: &mut impl Write,
    handle: &app::Handle,
    writer: &JoinHandle<T>,
) -> Result<(), AppError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last_line = String::new();
    loop {
        let c = handle.queue.counts().await?;
        let line = format!(
            "  pending {}  declared {}  uploading {}  uploaded {}  processed {}  failed {}",
            c.pending, c.declared, c.uploading, c.uploaded, c.processed, c.failed
        );
        if line != last_line {
            say(out, &line)?;
            last_line = line;
        }
        if c.processed + c.failed >= TOTAL && writer.is_finished() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return say(out, "  (stopping: not done within 60 s)");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn show_jobs(out: &mut impl Write, jobs: &[Job]) -> Result<(), AppError> {
    for j in jobs.iter().rev() {
        let name = Path::new(&j.path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let how = match (j.state, j.upload_status) {
            (State::Processed, Some(409)) => {
                "processed (uploaded via 409: the dropped answer's upload had got through)"
            }
            (State::Processed, _) => "processed, results written",
            (s, _) => s.as_str(),
        };
        say(
            out,
            format_args!(
                "  {:<20} {:>7} bytes  {}  {}",
                name,
                j.size,
                j.interaction_id.as_deref().unwrap_or("-"),
                how
            ),
        )?;
    }
    Ok(())
}

/// The first lines of one transcript, and the names of the other results written beside it.
fn show_transcript(out: &mut impl Write, results: &Path, jobs: &[Job]) -> Result<(), AppError> {
    let Some(j) = jobs.iter().find(|j| j.state == State::Processed) else {
        return Ok(());
    };
    let txt = crate::results::result_path(results, j, "text");
    let Ok(text) = std::fs::read_to_string(&txt) else {
        return Ok(());
    };
    say(out, "")?;
    say(
        out,
        format_args!("  transcript of {} (first lines):", txt.display()),
    )?;
    for line in text.lines().take(6) {
        say(out, format_args!("    {line}"))?;
    }
    let listing: Vec<String> = ["transcript", "punctuated", "ai"]
        .iter()
        .map(|k| crate::results::result_path(results, j, k))
        .filter(|p| p.exists())
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    say(out, format_args!("  also written: {}", listing.join(", ")))
}
