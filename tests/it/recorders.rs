//! Recorder simulation: writers that behave like Asterisk, FreeSWITCH, sox, ffmpeg, rsync, scp, cp
//! and mv. Each scenario asserts: no premature upload (every stored upload has the final bytes of
//! its version), no missed file.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use callferry_fake::{wav_bytes, wav_header};

use crate::helpers::*;

/// WAV header placeholder styles recorders use while a call is recorded.
#[derive(Clone, Copy, Debug)]
enum Placeholder {
    Asterisk,   // RIFF 0, data 0
    Libsndfile, // RIFF 8, data 0
    Sox,        // 0x7FFFF0xx
    Ffmpeg,     // 0xFFFFFFFF
}

fn placeholder_header(style: Placeholder) -> Vec<u8> {
    let (riff, data) = match style {
        Placeholder::Asterisk => (0u32, 0u32),
        Placeholder::Libsndfile => (8, 0),
        Placeholder::Sox => (0x7FFF_F024, 0x7FFF_F000),
        Placeholder::Ffmpeg => (0xFFFF_FFFF, 0xFFFF_FFFF),
    };
    let mut h = wav_header(0);
    h[4..8].copy_from_slice(&riff.to_le_bytes());
    h[40..44].copy_from_slice(&data.to_le_bytes());
    h
}

/// The final bytes a recorder leaves: the audio under a correct header.
fn final_wav(audio: &[u8]) -> Vec<u8> {
    let mut v = wav_header(audio.len() as u32);
    v.extend_from_slice(audio);
    v
}

fn audio(seconds: f64) -> Vec<u8> {
    wav_bytes(seconds, 330.0)[44..].to_vec()
}

struct Recording {
    path: PathBuf,
    style: Placeholder,
    audio: Vec<u8>,
    chunks: usize,
    gap: Duration,
    /// After this chunk, a pause (hold music) while the file stays open.
    pause_after: Option<(usize, Duration)>,
    /// Fix the header at the end (false: the recorder was killed).
    finish: bool,
}

/// Records in place, holding the file open for the whole call. Returns the final bytes.
fn record(r: &Recording) -> Vec<u8> {
    let mut f = std::fs::File::create(&r.path).unwrap();
    f.write_all(&placeholder_header(r.style)).unwrap();
    let step = r.audio.len().div_ceil(r.chunks);
    for (i, chunk) in r.audio.chunks(step).enumerate() {
        f.write_all(chunk).unwrap();
        f.flush().unwrap();
        std::thread::sleep(r.gap);
        if let Some((after, pause)) = r.pause_after
            && after == i
        {
            std::thread::sleep(pause);
        }
    }
    if r.finish {
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(&wav_header(r.audio.len() as u32)).unwrap();
        f.sync_all().unwrap();
        final_wav(&r.audio)
    } else {
        let mut v = placeholder_header(r.style);
        v.extend_from_slice(&r.audio);
        v
    }
}

/// Every job for `path`, with its upload checked against `bytes`.
async fn assert_one_upload(app: &TestApp, path: &Path, bytes: &[u8]) {
    let job = app.wait_state(path, "uploaded").await;
    app.assert_uploaded_once(&job, bytes);
    let all: Vec<_> = app
        .jobs()
        .await
        .into_iter()
        .filter(|j| Path::new(&j.path) == path)
        .collect();
    assert_eq!(all.len(), 1, "one version of {}: {all:?}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_recordings_with_every_placeholder_style_are_uploaded_only_when_final() {
    let mut app = TestApp::start("").await;
    let styles = [
        Placeholder::Asterisk,
        Placeholder::Libsndfile,
        Placeholder::Sox,
        Placeholder::Ffmpeg,
    ];
    let writers: Vec<_> = styles
        .iter()
        .enumerate()
        .map(|(i, style)| {
            let r = Recording {
                path: app.rec.join(format!("call-{i}-{style:?}.wav")),
                style: *style,
                audio: audio(2.0 + i as f64 * 0.3),
                chunks: 8,
                gap: Duration::from_millis(100),
                pause_after: None,
                finish: true,
            };
            std::thread::spawn(move || (r.path.clone(), record(&r)))
        })
        .collect();
    for w in writers {
        let (path, bytes) = w.join().unwrap();
        assert_one_upload(&app, &path, &bytes).await;
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_longer_than_settle_with_the_file_open_is_not_the_end_of_the_call() {
    let mut app = TestApp::start("").await; // settle = 300ms
    let r = Recording {
        path: app.rec.join("on-hold.wav"),
        style: Placeholder::Asterisk,
        audio: audio(2.0),
        chunks: 4,
        gap: Duration::from_millis(50),
        pause_after: Some((1, Duration::from_millis(1500))),
        finish: true,
    };
    let path = r.path.clone();
    let writer = std::thread::spawn(move || record(&r));
    // During the hold the file is quiet for 5× settle: still nothing may be queued.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1200) {
        assert!(app.job_for(&path).await.is_none(), "queued during the hold");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bytes = writer.join().unwrap();
    assert_one_upload(&app, &path, &bytes).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_recorder_is_uploaded_after_the_orphan_grace_with_what_it_left() {
    let mut app = TestApp::start("[watch]\norphan_grace = \"1500ms\"\n").await;
    let r = Recording {
        path: app.rec.join("killed.wav"),
        style: Placeholder::Sox,
        audio: audio(1.0),
        chunks: 3,
        gap: Duration::from_millis(30),
        pause_after: None,
        finish: false,
    };
    let path = r.path.clone();
    let bytes = record(&r);
    let job = app.wait_state(&path, "uploaded").await;
    let last_write_ms = job.mtime_ns / 1_000_000;
    assert!(
        job.created_at - last_write_ms >= 1500,
        "queued {} ms after the last write, before the orphan grace",
        job.created_at - last_write_ms
    );
    app.assert_uploaded_once(&job, &bytes);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_mode_uploads_each_finished_version_as_its_own_interaction() {
    let mut app = TestApp::start("").await;
    let path = app.rec.join("append.wav");
    let first = audio(1.0);
    std::fs::write(&path, final_wav(&first)).unwrap();
    let v1 = final_wav(&first);
    let job1 = app.wait_state(&path, "uploaded").await;
    app.assert_uploaded_once(&job1, &v1);

    // FreeSWITCH record_append: reopen, append, fix the header.
    let more = audio(0.5);
    {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(&more).unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all(&wav_header((first.len() + more.len()) as u32))
            .unwrap();
    }
    let mut all_audio = first.clone();
    all_audio.extend_from_slice(&more);
    let v2 = final_wav(&all_audio);
    let job2 = poll_for("the second version", || async {
        app.jobs().await.into_iter().find(|j| {
            Path::new(&j.path) == path
                && j.size == v2.len() as u64
                && j.state.as_str() == "uploaded"
        })
    })
    .await;
    assert_ne!(
        job1.interaction_id, job2.interaction_id,
        "a new interaction"
    );
    let rec2 = app.interaction(job2.interaction_id.as_deref().unwrap());
    assert_eq!(rec2.uploads.iter().filter(|u| u.stored).count(), 1);
    assert_eq!(
        rec2.uploads.iter().find(|u| u.stored).unwrap().sha256,
        sha256(&v2)
    );
    let events = app.handle.queue.events(job1.id).await.unwrap();
    assert!(events.iter().any(|e| e.1 == "uploaded"));
    assert_eq!(app.fake.counters().declares, 2);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_names_then_rename_are_uploaded_once_under_the_final_name() {
    let mut app = TestApp::start("").await;
    let mut expected = Vec::new();
    // rsync: .name.XXXXXX, written slowly, then renamed.
    for (tmp, name) in [
        (".a.wav.Xy12Zq", "a.wav"),
        ("b.wav.part", "b.wav"),
        ("c.wav.filepart", "c.wav"),
        ("d.wav.tmp", "d.wav"),
    ] {
        let bytes = final_wav(&audio(1.0));
        let t = app.rec.join(tmp);
        {
            let mut f = std::fs::File::create(&t).unwrap();
            for c in bytes.chunks(4000) {
                f.write_all(c).unwrap();
                std::thread::sleep(Duration::from_millis(40));
            }
        }
        std::fs::rename(&t, app.rec.join(name)).unwrap();
        expected.push((app.rec.join(name), bytes));
    }
    for (p, b) in &expected {
        assert_one_upload(&app, p, b).await;
    }
    let paths: Vec<String> = app.jobs().await.into_iter().map(|j| j.path).collect();
    assert_eq!(paths.len(), 4, "no temp name was queued: {paths:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_copy_is_not_uploaded_until_the_copy_completes() {
    let mut app = TestApp::start("[watch]\norphan_grace = \"20s\"\n").await;
    let bytes = final_wav(&audio(2.0));
    let path = app.rec.join("scp.wav");
    // scp/cp writing the final name directly: half the file, then the connection drops.
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    // Closed, quiet for 4× settle, header claims more than is there: not complete.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1200) {
        assert!(
            app.job_for(&path).await.is_none(),
            "a truncated copy was queued"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The copy is resumed and completes.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(&bytes[bytes.len() / 2..]).unwrap();
    drop(f);
    assert_one_upload(&app, &path, &bytes).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_mv_and_hard_links_upload_each_recording_once() {
    let dir2 = tempfile::tempdir().unwrap();
    let rec2 = dir2.path().join("rec2");
    std::fs::create_dir_all(&rec2).unwrap();
    // The harness's folder is only known once it runs: restart with both roots watched.
    let mut app = TestApp::start("").await;
    app.stop().await;
    app.extra_toml = format!(
        "[watch]\npaths = [\"{}\", \"{}\"]\n",
        app.rec.display(),
        rec2.display()
    );
    app.restart().await;

    let outside = app.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    // cp from outside into the tree: a new file, uploaded.
    let src = outside.join("src.wav");
    let b_cp = final_wav(&audio(1.0));
    std::fs::write(&src, &b_cp).unwrap();
    let p_cp = app.rec.join("copied.wav");
    std::fs::copy(&src, &p_cp).unwrap();
    assert_one_upload(&app, &p_cp, &b_cp).await;

    // mv from outside into the tree: uploaded.
    let b_mv = final_wav(&audio(1.1));
    let src2 = outside.join("moved.wav");
    std::fs::write(&src2, &b_mv).unwrap();
    let p_mv = app.rec.join("moved.wav");
    std::fs::rename(&src2, &p_mv).unwrap();
    assert_one_upload(&app, &p_mv, &b_mv).await;

    // mv within the tree, and a hard link into the other watched folder: the same recording.
    let p_inside = app.rec.join("sub/moved-again.wav");
    std::fs::create_dir_all(p_inside.parent().unwrap()).unwrap();
    std::fs::rename(&p_mv, &p_inside).unwrap();
    let p_link = rec2.join("linked.wav");
    std::fs::hard_link(&p_cp, &p_link).unwrap();
    // A marker file dropped after them: once it is uploaded, the moves/links have been seen.
    let b_marker = final_wav(&audio(0.3));
    let p_marker = app.drop_file("marker.wav", &b_marker);
    assert_one_upload(&app, &p_marker, &b_marker).await;
    // The periodic rescan would see them too: force the same path through a restart (startup scan).
    app.stop().await;
    app.restart().await;
    let b_marker2 = final_wav(&audio(0.4));
    let p_marker2 = app.drop_file("marker2.wav", &b_marker2);
    assert_one_upload(&app, &p_marker2, &b_marker2).await;
    let c = app.fake.counters();
    assert_eq!(
        c.uploads_stored, 4,
        "copied, moved, two markers; no re-upload of moved or linked files"
    );
    assert!(app.job_for(&p_inside).await.is_none());
    assert!(app.job_for(&p_link).await.is_none());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_date_folder_created_and_written_at_once_is_not_missed() {
    let mut app = TestApp::start("").await;
    let mut expected = Vec::new();
    for day in 1..=5 {
        let dir = app.rec.join(format!("2026/11/{day:02}/sub"));
        std::fs::create_dir_all(&dir).unwrap();
        // Written straight away, before the watch on the new folder can exist.
        let b = final_wav(&audio(0.3 + day as f64 * 0.05));
        let p = dir.join(format!("call-{day}.wav"));
        std::fs::write(&p, &b).unwrap();
        expected.push((p, b));
    }
    for (p, b) in &expected {
        assert_one_upload(&app, p, b).await;
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polled_folder_without_events_is_still_served() {
    let mut app = TestApp::start("[watch]\npoll_interval = \"300ms\"\n").await;
    let r = Recording {
        path: app.rec.join("nfs/slow.wav"),
        style: Placeholder::Asterisk,
        audio: audio(1.5),
        chunks: 6,
        gap: Duration::from_millis(120),
        pause_after: None,
        finish: true,
    };
    std::fs::create_dir_all(app.rec.join("nfs")).unwrap();
    let bytes = record(&r);
    assert_one_upload(&app, &r.path, &bytes).await;
    let b = final_wav(&audio(0.5));
    let p = app.drop_file("nfs/dropped.wav", &b);
    assert_one_upload(&app, &p, &b).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_ten_thousand_files_overflows_the_event_queue_and_none_is_missed() {
    let mut app = TestApp::start("[upload]\nworkers = 8\n").await;
    let n = 10_000;
    let body = final_wav(&audio(0.01)); // 204 bytes: the burst is about events, not bytes
    let dir = app.rec.join("burst");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..n {
        std::fs::write(dir.join(format!("b{i:05}.wav")), &body).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let c = app.fake.counters();
        if c.uploads_stored >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} uploaded",
            c.uploads_stored
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let c = app.fake.counters();
    assert_eq!(c.uploads_stored, n, "each file once");
    assert_eq!(c.declares, n);
    let recs = app.fake.interactions();
    let want = sha256(&body);
    assert!(recs.iter().all(|r| {
        r.uploads
            .iter()
            .filter(|u| u.stored)
            .all(|u| u.sha256 == want)
    }));
    let mut names: Vec<String> = recs
        .iter()
        .flat_map(|r| {
            r.uploads
                .iter()
                .filter(|u| u.stored)
                .map(|u| u.field_name.clone())
        })
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len() as u64, n, "no file missed, none twice");
    app.stop().await;
}

/// An 8-hour call (8 kHz 16-bit mono: 460 MB), recorded in place at compressed speed with an
/// Asterisk placeholder header, by a `callferry run` process: uploaded once, complete, with flat
/// memory. `cargo test --release --test it long_call -- --ignored --nocapture`;
/// CALLFERRY_BENCH_CALL_BYTES=1073741824 for a 1 GiB file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn long_call_is_uploaded_once_with_flat_memory() {
    use sha2::{Digest, Sha256};
    let audio_len: u64 = std::env::var("CALLFERRY_BENCH_CALL_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8 * 3600 * 8000 * 2);
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let fake = callferry_fake::FakeApi::start(callferry_fake::FakeOptions {
        token: TOKEN.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let text = config_text(
        &fake.base_url(),
        dir.path(),
        "[watch]\nsettle = \"1s\"\n[log]\nlevel = \"warn\"\n",
    );
    let cfg_path = dir.path().join("callferry.toml");
    std::fs::write(&cfg_path, &text).unwrap();
    let mut child = crate::results::ChildGuard(
        std::process::Command::new(env!("CARGO_BIN_EXE_callferry"))
            .arg("--config")
            .arg(&cfg_path)
            .arg("run")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let hwm = move || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .unwrap_or(0)
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let path = rec.join("eight-hours.wav");
    let t = Instant::now();
    let (digest, hwm_while_recording) = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            let mut f = std::fs::File::create(&path).unwrap();
            let header = placeholder_header(Placeholder::Asterisk);
            f.write_all(&header).unwrap();
            let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
            let mut written = 0u64;
            let mut n = 0u64;
            let mut hwm_max = 0;
            while written < audio_len {
                let k = chunk.len().min((audio_len - written) as usize);
                f.write_all(&chunk[..k]).unwrap();
                written += k as u64;
                n += 1;
                if n % 32 == 0 {
                    // A recorder writes steadily; now and then a pause longer than settle.
                    std::thread::sleep(Duration::from_millis(if n % 256 == 0 { 1500 } else { 20 }));
                    hwm_max = hwm_max.max(hwm());
                }
            }
            f.seek(SeekFrom::Start(0)).unwrap();
            f.write_all(&wav_header(audio_len as u32)).unwrap();
            f.sync_all().unwrap();
            drop(f);
            let mut h = Sha256::new();
            let mut r = std::fs::File::open(&path).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let k = std::io::Read::read(&mut r, &mut buf).unwrap();
                if k == 0 {
                    break;
                }
                h.update(&buf[..k]);
            }
            (hex::encode(h.finalize()), hwm_max)
        })
        .await
        .unwrap()
    };
    let recorded_in = t.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    while fake.counters().uploads_stored < 1 {
        assert!(Instant::now() < deadline, "not uploaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recs = fake.interactions();
    let stored: Vec<_> = recs
        .iter()
        .flat_map(|r| r.uploads.iter().filter(|u| u.stored))
        .collect();
    assert_eq!(stored.len(), 1, "uploaded once");
    assert_eq!(stored[0].size, audio_len + 44);
    assert_eq!(
        stored[0].sha256, digest,
        "the final bytes, not a partial recording"
    );
    let hwm_end = hwm();
    println!(
        "{:.0} MB call recorded in {:.1}s; daemon VmHWM while recording {:.1} MiB, after upload {:.1} MiB; declares {}",
        (audio_len + 44) as f64 / 1e6,
        recorded_in.as_secs_f64(),
        hwm_while_recording as f64 / 1024.0,
        hwm_end as f64 / 1024.0,
        fake.counters().declares
    );
    assert_eq!(fake.counters().declares, 1);
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert!(child.0.wait().unwrap().success());
    assert!(hwm_end < 64 * 1024);
}
