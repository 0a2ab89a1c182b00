//! Owns `callferry demo`: the whole flow on one machine with nothing set up — the built-in fake
//! ElevateAI on loopback, a temporary watched folder and database, generated recordings (one of
//! them written slowly in place, as a recorder does), and live progress until they are through.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::app::{self, AppError};
use crate::fake::{FakeApi, FakeOptions};
use crate::queue::State;

const DEMO_TOKEN: &str = "demo-token-not-secret";

/// A mono 16-bit 8 kHz PCM WAV of `seconds` of a tone, with a correct header.
pub fn wav_bytes(seconds: f64, freq: f64) -> Vec<u8> {
    let rate = 8000u32;
    let n = (seconds * rate as f64) as u32;
    let mut out = wav_header(n * 2);
    for i in 0..n {
        let t = i as f64 / rate as f64;
        let v = ((t * freq * std::f64::consts::TAU).sin() * 8000.0) as i16;
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// A 44-byte PCM WAV header for `data_len` bytes of 8 kHz 16-bit mono samples.
pub fn wav_header(data_len: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(b"RIFF");
    h.extend_from_slice(&(36 + data_len).to_le_bytes());
    h.extend_from_slice(b"WAVEfmt ");
    h.extend_from_slice(&16u32.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes()); // PCM
    h.extend_from_slice(&1u16.to_le_bytes()); // mono
    h.extend_from_slice(&8000u32.to_le_bytes());
    h.extend_from_slice(&16000u32.to_le_bytes());
    h.extend_from_slice(&2u16.to_le_bytes());
    h.extend_from_slice(&16u16.to_le_bytes());
    h.extend_from_slice(b"data");
    h.extend_from_slice(&data_len.to_le_bytes());
    h
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

pub async fn run() -> Result<i32, AppError> {
    let started = Instant::now();
    let dir = tempfile::tempdir().map_err(|e| AppError::Other(format!("temp dir: {e}")))?;
    let rec = dir.path().join("recordings");
    std::fs::create_dir_all(&rec).map_err(|e| AppError::Other(e.to_string()))?;
    let fake = FakeApi::start(FakeOptions {
        token: DEMO_TOKEN.into(),
        processing_time: Duration::from_secs(2),
        ..Default::default()
    })
    .await
    .map_err(|e| AppError::Other(format!("cannot start the fake API: {e}")))?;
    // One upload is answered by a dropped connection after the service stored it: the retry then
    // gets 409, which callferry counts as uploaded.
    fake.push_fault(
        crate::fake::Endpoint::Upload,
        crate::fake::Fault::ResetAfterStore,
    );

    println!("callferry demo");
    println!("  fake ElevateAI  {}", fake.base_url());
    println!("  watched folder  {}", rec.display());
    println!();

    let cfg = demo_config(&fake.base_url(), dir.path())?;
    let shutdown = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let daemon = tokio::spawn(app::run(cfg, shutdown.clone(), Some(tx)));
    let handle = match rx.await {
        Ok(h) => h,
        Err(_) => {
            return match daemon.await {
                Ok(Err(e)) => Err(e),
                _ => Err(AppError::Other("the daemon did not start".into())),
            };
        }
    };

    // Four finished recordings arrive the way rsync/scp deliver them (temporary name, then
    // rename); a fifth is recorded live, in place, over ~3 seconds.
    let names = [
        "sales-0001.wav",
        "support-0002.wav",
        "billing-0003.wav",
        "support-0004.wav",
    ];
    for (i, name) in names.iter().enumerate() {
        let tmp = rec.join(format!(".{name}.part"));
        std::fs::write(&tmp, wav_bytes(2.0 + i as f64, 440.0 + 110.0 * i as f64))
            .and_then(|_| std::fs::rename(&tmp, rec.join(name)))
            .map_err(|e| AppError::Other(e.to_string()))?;
        println!("  dropped    {name}");
    }
    let live = rec.join("live-call-0005.wav");
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
    println!("  recording  live-call-0005.wav (written in place for ~3s)");
    println!();

    let total = names.len() as u64 + 1;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last_line = String::new();
    loop {
        let c = handle.queue.counts().await?;
        let line = format!(
            "  pending {}  declared {}  uploading {}  uploaded {}  processed {}  failed {}",
            c.pending, c.declared, c.uploading, c.uploaded, c.processed, c.failed
        );
        if line != last_line {
            println!("{line}");
            last_line = line;
        }
        if c.processed + c.failed >= total && writer.is_finished() {
            break;
        }
        if Instant::now() > deadline {
            println!("  (stopping: not done within 60 s)");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = writer.await;

    println!();
    let jobs = handle.queue.list(None, 100).await?;
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
        println!(
            "  {:<20} {:>7} bytes  {}  {}",
            name,
            j.size,
            j.interaction_id.as_deref().unwrap_or("-"),
            how
        );
    }
    let fc = fake.counters();
    println!();
    println!(
        "  fake API saw: {} declares, {} uploads stored, {} answered 409, {} injected faults",
        fc.declares, fc.uploads_stored, fc.uploads_conflict, fc.faults_injected
    );
    let done = jobs.iter().filter(|j| j.state == State::Processed).count() as u64;
    println!(
        "  {done}/{total} recordings uploaded exactly once and transcribed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let out = dir.path().join("results");
    if let Some(j) = jobs.iter().find(|j| j.state == State::Processed) {
        let txt = crate::results::result_path(&out, j, "text");
        if let Ok(text) = std::fs::read_to_string(&txt) {
            println!();
            println!("  transcript of {} (first lines):", txt.display());
            for line in text.lines().take(6) {
                println!("    {line}");
            }
            let listing: Vec<String> = ["transcript", "punctuated", "ai"]
                .iter()
                .map(|k| crate::results::result_path(&out, j, k))
                .filter(|p| p.exists())
                .map(|p| {
                    p.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            println!("  also written: {}", listing.join(", "));
        }
    }

    shutdown.cancel();
    daemon
        .await
        .map_err(|e| AppError::Other(format!("daemon task: {e}")))??;
    fake.shutdown().await;
    Ok(if done == total { 0 } else { 1 })
}
