//! Issue 12 (items 1, 5, 9) and 17.13: a server that redirects, lies, floods, drips or quotes the
//! token back. The fake plays it (`Fault::Redirect`, `EchoToken`, `HugeBody`, `EndlessBody`,
//! `SlowDrip`, `GarbageBytes`, `BadId`); the verdicts come from the fake's own records, the
//! database's bytes and what the daemon shows.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callferry::api::{ApiClient, ApiError, ErrorClass};
use callferry::queue::State;
use callferry::secret::Secret;
use callferry_fake::{Endpoint, FakeApi, FakeOptions, Fault};
use tokio::io::AsyncReadExt;

use crate::hardening::proc::{Daemon, callferry, queue_when_ready};
use crate::helpers::*;

const MIB: u64 = 1024 * 1024;

/// The "other host" a redirect names: it records every connection and byte it gets, and answers
/// nothing.
struct Witness {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    bytes: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Witness {
    async fn start() -> Witness {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let (c, b) = (conns.clone(), bytes.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let b = b.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await
                    {
                        if n == 0 {
                            break;
                        }
                        b.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        Witness {
            addr,
            conns,
            bytes,
            task,
        }
    }

    fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn assert_untouched(&self) {
        let seen = self.bytes.lock().unwrap().clone();
        assert_eq!(
            self.conns.load(Ordering::SeqCst),
            0,
            "the redirect target was contacted; it received: {}",
            String::from_utf8_lossy(&seen)
        );
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn client(app: &TestApp, extra: &str) -> ApiClient {
    let cfg = load_config(&config_text(&app.fake.base_url(), app.dir.path(), extra));
    ApiClient::new(&cfg, Secret::new(TOKEN)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_never_followed_and_a_redirected_upload_is_not_an_upload() {
    let witness = Witness::start().await;
    let app = TestApp::start("[after_upload]\naction = \"delete\"\nwhen = \"uploaded\"\n").await;
    app.fake.push_fault(
        Endpoint::Declare,
        Fault::Redirect {
            status: 307,
            location: format!("{}/v1/interactions", witness.origin()),
        },
    );
    // 307/308 keep the method and body: followed, they would carry the audio and the token away.
    for i in 0..1000 {
        app.fake.push_fault(
            Endpoint::Upload,
            Fault::Redirect {
                status: [307, 302, 308, 301][i % 4],
                location: format!("{}/v1/interactions/x/upload", witness.origin()),
            },
        );
    }
    let bytes = wav(0.5);
    let path = app.drop_file("call.wav", &bytes);
    let job = poll_for("an upload answered with a redirect", || async {
        let j = app.job_for(&path).await?;
        let redirected = j
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("redirected to") && e.contains(&witness.origin()));
        (j.interaction_id.is_some() && redirected).then_some(j)
    })
    .await;
    assert_ne!(job.state, State::Uploaded, "{job:?}");
    assert!(
        path.exists(),
        "a redirected upload must not delete the recording"
    );
    assert_eq!(
        job.attempts, 0,
        "a redirect is not the job's fault: no attempt counted"
    );
    let iid = job.interaction_id.clone().unwrap();
    let rec = app.interaction(&iid);
    assert!(!rec.uploads.is_empty());
    assert!(
        rec.uploads
            .iter()
            .all(|u| !u.stored && [301, 302, 307, 308].contains(&u.answered)),
        "{:?}",
        rec.uploads
    );
    assert_eq!(
        app.fake.interactions().len(),
        1,
        "the redirected declare created nothing"
    );
    witness.assert_untouched();

    // The server stops redirecting: the audio goes to the same interaction, once, and only then
    // is the recording deleted.
    app.fake.clear_faults();
    let done = app.wait_state(&path, "uploaded").await;
    assert_eq!(done.interaction_id.as_deref(), Some(iid.as_str()));
    app.assert_uploaded_once(&done, &bytes);
    eventually("the recording to be deleted after its upload", || async {
        !path.exists()
    })
    .await;
    witness.assert_untouched();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_names_a_redirects_host_and_cuts_off_huge_endless_and_dripping_bodies() {
    let witness = Witness::start().await;
    let app = TestApp::start("").await;
    let api = client(&app, "[api]\nstall_timeout = \"1500ms\"\n");
    let req = declare_request(Some("a.wav"));

    app.fake.push_fault(
        Endpoint::Status,
        Fault::Redirect {
            status: 302,
            location: format!("{}/elsewhere?x=1", witness.origin()),
        },
    );
    let e = api.status("any").await.unwrap_err();
    assert!(matches!(e, ApiError::Redirected { status: 302, .. }), "{e}");
    assert_eq!(e.class(), ErrorClass::Unreachable);
    assert!(e.to_string().contains(&witness.origin()), "{e}");
    assert!(!e.to_string().contains("elsewhere"), "only the origin: {e}");
    witness.assert_untouched();
    // Nor is a redirected token check a pass (check-config --online, the 401 re-check).
    app.fake.push_fault(
        Endpoint::Status,
        Fault::Redirect {
            status: 307,
            location: format!("{}/v1/interactions/x/status", witness.origin()),
        },
    );
    let e = api.probe_auth().await.unwrap_err();
    assert!(matches!(e, ApiError::Redirected { status: 307, .. }), "{e}");
    witness.assert_untouched();

    // JSON answers: 1 MiB at most, whatever the server sends.
    app.fake
        .push_fault(Endpoint::Declare, Fault::HugeBody(3 * MIB));
    let e = api.declare(&req).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("larger than the 1048576 bytes allowed"),
        "{e}"
    );
    assert_eq!(
        e.class(),
        ErrorClass::Transient,
        "a lie from the server counts"
    );
    app.fake.push_fault(Endpoint::Status, Fault::EndlessBody);
    let e = api.status("any").await.unwrap_err();
    assert!(
        e.to_string()
            .contains("larger than the 1048576 bytes allowed"),
        "{e}"
    );

    // A drip that never ends is a stall, however busy it looks.
    app.fake
        .push_fault(Endpoint::Status, Fault::SlowDrip(Duration::from_millis(50)));
    let e = api.status("any").await.unwrap_err();
    assert!(matches!(e, ApiError::Stalled(_)), "{e}");

    // Garbage in an error body comes out printable.
    app.fake
        .push_fault(Endpoint::Declare, Fault::GarbageBytes(502));
    let e = api.declare(&req).await.unwrap_err().to_string();
    assert!(e.starts_with("HTTP 502"), "{e}");
    assert!(!e.chars().any(|c| c.is_control()), "{e:?}");

    // Results go to a file under their own cap: within it, written whole; past it, an error.
    let iid = api.declare(&req).await.unwrap();
    let tail = format!("interactions/{iid}/transcript");
    let dir = tempfile::tempdir().unwrap();
    let within = dir.path().join("within");
    app.fake
        .push_fault(Endpoint::Results, Fault::HugeBody(3 * MIB + 7));
    let mut f = tokio::fs::File::create(&within).await.unwrap();
    let n = api.get_to_file(&tail, &mut f, 4 * MIB).await.unwrap();
    drop(f);
    assert_eq!(n, 3 * MIB + 7);
    assert_eq!(std::fs::metadata(&within).unwrap().len(), 3 * MIB + 7);
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&within).unwrap()).unwrap();
    assert!(doc.get("pad").is_some());
    for fault in [Fault::HugeBody(3 * MIB), Fault::EndlessBody] {
        let past = dir.path().join("past");
        app.fake.push_fault(Endpoint::Results, fault);
        let mut f = tokio::fs::File::create(&past).await.unwrap();
        let e = api.get_to_file(&tail, &mut f, MIB).await.unwrap_err();
        drop(f);
        assert!(
            e.to_string()
                .contains("larger than the 1048576 bytes allowed"),
            "{e}"
        );
        assert!(std::fs::metadata(&past).unwrap().len() <= MIB);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_strips_the_token_from_everything_the_server_says() {
    let app = TestApp::start("").await;
    let api = client(&app, "");
    let req = declare_request(Some("a.wav"));
    for (ep, code) in [
        (Endpoint::Declare, 401),
        (Endpoint::Declare, 403),
        (Endpoint::Declare, 422),
        (Endpoint::Declare, 503),
        (Endpoint::Status, 404),
        (Endpoint::Status, 500),
    ] {
        app.fake.push_fault(ep, Fault::EchoToken(code));
        let e = match ep {
            Endpoint::Declare => api.declare(&req).await.unwrap_err(),
            _ => api.status("any").await.unwrap_err(),
        };
        let text = format!("{e} {e:?}");
        assert!(
            text.contains("[redacted]"),
            "the server's text is kept: {text}"
        );
        assert!(!text.contains(TOKEN), "{code}: {text}");
    }
    // An interaction "id" that is the token is no id: it would go into URLs, logs and the database.
    app.fake
        .push_fault(Endpoint::Declare, Fault::BadId(format!("x{TOKEN}")));
    let e = api.declare(&req).await.unwrap_err().to_string();
    assert!(e.contains("unusable interaction id"), "{e}");
    assert!(!e.contains(TOKEN), "{e}");
    // An id that is fine otherwise but unusable for a path.
    app.fake
        .push_fault(Endpoint::Declare, Fault::BadId("../../etc".into()));
    assert!(
        api.declare(&req)
            .await
            .unwrap_err()
            .to_string()
            .contains("unusable interaction id")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_answers_on_every_call_cost_no_recording_and_leave_no_partial_result() {
    let out = tempfile::tempdir().unwrap();
    let app = TestApp::start(&format!(
        "[api]\nstall_timeout = \"2s\"\n[results]\nenabled = true\noutput_dir = \"{}\"\n\
         poll_interval = \"200ms\"\nmax_bytes = 1048576\nformat = \"text\"\n\
         [upload]\nmax_declares = 4\n",
        out.path().display()
    ))
    .await;
    let f = &app.fake;
    // Three unusable declare answers: three possible orphans, one under `max_declares`.
    f.push_fault(Endpoint::Declare, Fault::HugeBody(3 * MIB));
    f.push_fault(Endpoint::Declare, Fault::EndlessBody);
    f.push_fault(Endpoint::Declare, Fault::MissingId);
    f.push_fault(Endpoint::Upload, Fault::GarbageBytes(503));
    f.push_fault(Endpoint::Status, Fault::EndlessBody);
    f.push_fault(
        Endpoint::Status,
        Fault::SlowDrip(Duration::from_millis(100)),
    );
    f.push_fault(Endpoint::Results, Fault::HugeBody(2 * MIB));
    f.push_fault(Endpoint::Results, Fault::EndlessBody);
    f.push_fault(Endpoint::Results, Fault::GarbageJson);
    let bytes = wav(0.5);
    let path = app.drop_file("day/call.wav", &bytes);
    let job = app.wait_state(&path, "processed").await;
    app.assert_uploaded_once(&job, &bytes);
    // Every result is whole JSON from the fake; nothing half-written or temporary is left.
    let transcript = out.path().join("day/call.wav.transcript.json");
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&transcript).unwrap()).unwrap();
    assert!(
        doc.get("pad").is_none(),
        "the oversized answer was not kept"
    );
    assert!(out.path().join("day/call.wav.txt").is_file());
    let names: Vec<String> = std::fs::read_dir(out.path().join("day"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with('.')),
        "temporary files left: {names:?}"
    );
    let events = app.handle.queue.events(job.id).await.unwrap();
    let reasons: Vec<&str> = events.iter().filter_map(|e| e.2.as_deref()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("larger than the 1048576 bytes allowed")),
        "{reasons:?}"
    );
    // The faulted declares did no work; MissingId's did, and left one orphan.
    assert_eq!(app.fake.interactions().len(), 2);
}

/// Peak resident memory of a process, from the kernel (`VmHWM`), in bytes.
fn peak_rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_result_goes_to_disk_without_passing_through_memory() {
    const BODY: u64 = 96 * MIB;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rec")).unwrap();
    let out = dir.path().join("out");
    let fake = FakeApi::start(FakeOptions {
        token: TOKEN.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let cfg = crate::hardening::proc::write_config(
        dir.path(),
        &fake.base_url(),
        &format!(
            "[results]\nenabled = true\noutput_dir = \"{}\"\npoll_interval = \"200ms\"\n\
             kinds = [\"transcript\"]\n",
            out.display()
        ),
    );
    fake.push_fault(Endpoint::Results, Fault::HugeBody(BODY));
    let mut d = Daemon::spawn(&cfg, &dir.path().join("daemon.log"), &[]);
    d.wait_log("callferry running").await;
    std::fs::write(dir.path().join("rec/big.wav"), wav(0.5)).unwrap();
    let q = queue_when_ready(&dir.path().join("state/queue.db")).await;
    eventually("the result to be written", || async {
        q.counts().await.unwrap().processed == 1
    })
    .await;
    let written = std::fs::metadata(out.join("big.wav.transcript.json"))
        .unwrap()
        .len();
    assert_eq!(written, BODY);
    let peak = peak_rss(d.pid());
    eprintln!(
        "peak RSS of the daemon after a {} MiB result: {:.1} MiB",
        BODY / MIB,
        peak as f64 / MIB as f64
    );
    // Read whole, the answer alone would be 96 MiB (and was twice that with its copy).
    assert!(
        peak < BODY / 2,
        "peak RSS {peak} bytes for a {BODY}-byte result"
    );
    q.close().await;
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(DEADLINE).await.code(), Some(0));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn cli_text(cfg: &Path, args: &[&str]) -> (Option<i32>, String) {
    let o = callferry()
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env("RUST_LOG", "trace")
        .output()
        .await
        .unwrap();
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

async fn http_get(url: &str) -> Option<(u16, String)> {
    let r = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    let code = r.status().as_u16();
    Some((code, r.text().await.ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_quoting_the_token_gets_it_into_no_log_database_status_or_healthz() {
    const SECRET: &str = "tok-Ech0ed-9c1f4e2b7a55";
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let out = dir.path().join("out");
    let fake = FakeApi::start(FakeOptions {
        token: SECRET.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let port = free_port();
    let text = config_text(
        &fake.base_url(),
        dir.path(),
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{port}\"\n[results]\nenabled = true\n\
             output_dir = \"{}\"\npoll_interval = \"200ms\"\n",
            out.display()
        ),
    )
    .replace(
        &format!("token = \"{TOKEN}\""),
        &format!("token = \"{SECRET}\""),
    );
    let cfg = dir.path().join("callferry.toml");
    std::fs::write(&cfg, text).unwrap();
    let mut shown: Vec<(String, String)> = Vec::new();

    // A 401 that quotes the token, and re-checks of the token that keep getting the same answer:
    // the pause lasts until the test has looked at it.
    fake.push_fault(Endpoint::Declare, Fault::EchoToken(401));
    for _ in 0..1000 {
        fake.push_fault(Endpoint::Status, Fault::EchoToken(401));
    }
    let log = dir.path().join("daemon.log");
    let mut d = Daemon::spawn(&cfg, &log, &[("RUST_LOG", "trace")]);
    d.wait_log("callferry running").await;
    std::fs::write(rec.join("a.wav"), wav(0.5)).unwrap();
    d.wait_log("the API rejected the token").await;
    let healthz = poll_for("/healthz to report the pause", || async {
        http_get(&format!("http://127.0.0.1:{port}/healthz"))
            .await
            .filter(|(code, _)| *code == 503)
    })
    .await;
    shown.push(("/healthz while paused".into(), healthz.1));
    let status = poll_for("status to show the pause", || async {
        let (_, t) = cli_text(&cfg, &["status", "--json"]).await;
        t.contains("[redacted]").then_some(t)
    })
    .await;
    shown.push(("status --json while paused".into(), status));

    // Then every other call quotes it too, in every kind of answer.
    fake.clear_faults();
    fake.push_fault(Endpoint::Declare, Fault::EchoToken(503));
    fake.push_fault(Endpoint::Declare, Fault::BadId(SECRET.into()));
    fake.push_fault(Endpoint::Upload, Fault::EchoToken(500));
    fake.push_fault(Endpoint::Upload, Fault::EchoToken(400));
    fake.push_fault(Endpoint::Status, Fault::EchoToken(500));
    fake.push_fault(Endpoint::Results, Fault::EchoToken(502));
    std::fs::write(rec.join("b.wav"), wav(0.5)).unwrap();
    let q = queue_when_ready(&dir.path().join("state/queue.db")).await;
    eventually("one recording processed and one refused", || async {
        let c = q.counts().await.unwrap();
        c.processed == 1 && c.failed == 1
    })
    .await;
    q.close().await;
    for args in [
        &["status", "--json"][..],
        &["status"],
        &["list", "--json"],
        &["list"],
    ] {
        let (code, t) = cli_text(&cfg, args).await;
        assert_eq!(code, Some(0), "{args:?}: {t}");
        shown.push((args.join(" "), t));
    }
    let (_, list) = &shown[shown.len() - 2];
    assert!(
        list.contains("[redacted]"),
        "the refusal's reason is kept, redacted:\n{list}"
    );
    if let Some((_, h)) = http_get(&format!("http://127.0.0.1:{port}/healthz")).await {
        shown.push(("/healthz after".into(), h));
    }
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(DEADLINE).await.code(), Some(0));

    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("[redacted]"),
        "the server's texts were logged"
    );
    shown.push(("the daemon's trace log".into(), log_text));
    for (what, t) in &shown {
        assert!(
            !t.contains(SECRET),
            "the token is in {what}:\n{}",
            t.lines()
                .filter(|l| l.contains(SECRET))
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let mut checked = 0;
    for e in std::fs::read_dir(dir.path().join("state"))
        .unwrap()
        .flatten()
    {
        let bytes = std::fs::read(e.path()).unwrap();
        let found = bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes());
        assert!(!found, "the token is in {}", e.path().display());
        checked += 1;
    }
    assert!(checked >= 2, "the database and its WAL were checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_base_url_are_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rec")).unwrap();
    let fake = FakeApi::start(FakeOptions {
        token: TOKEN.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let url = fake
        .base_url()
        .replace("http://", "http://gateway-user:Pa55-w0rd-7781@");
    let cfg = crate::hardening::proc::write_config(dir.path(), &url, "");
    let (code, online) = cli_text(&cfg, &["check-config", "--online"]).await;
    assert_eq!(code, Some(0), "{online}");
    assert!(online.contains("accepts the token"), "{online}");
    let log = dir.path().join("daemon.log");
    let mut d = Daemon::spawn(&cfg, &log, &[("RUST_LOG", "trace")]);
    d.wait_log("callferry running").await;
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(DEADLINE).await.code(), Some(0));
    let log_text = std::fs::read_to_string(&log).unwrap();
    for (what, t) in [("check-config --online", &online), ("the log", &log_text)] {
        assert!(!t.contains("Pa55-w0rd-7781"), "password in {what}:\n{t}");
        assert!(!t.contains("gateway-user"), "user in {what}:\n{t}");
    }
    // And a base_url that does not even parse is shown without them.
    std::fs::write(
        &cfg,
        "[api]\ntoken = \"x\"\nbase_url = \"https://u:Pa55-w0rd-7781@host:99999999/v1\"\n\
         [watch]\npaths = [\"/x\"]\n",
    )
    .unwrap();
    let (code, t) = cli_text(&cfg, &["check-config"]).await;
    assert_eq!(code, Some(78), "{t}");
    assert!(t.contains("api.base_url"), "{t}");
    assert!(!t.contains("Pa55-w0rd-7781"), "{t}");
}

// ---------------------------------------------------------------------------------------------
// HTTPS trust: a CA made here, at test time, with the openssl command line.

struct TestPki {
    ca_pem: std::path::PathBuf,
    server_pem: Vec<u8>,
    server_key: Vec<u8>,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the openssl command (Debian's openssl package)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private CA and a server certificate it signed for 127.0.0.1.
fn make_pki(dir: &Path) -> TestPki {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=callferry test CA",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    TestPki {
        ca_pem: dir.join("ca.pem"),
        server_pem: std::fs::read(dir.join("server.pem")).unwrap(),
        server_key: std::fs::read(dir.join("server.key")).unwrap(),
    }
}

async fn check_online(cfg: &Path, ssl_cert_file: Option<&Path>) -> (Option<i32>, String) {
    let mut c = callferry();
    c.arg("--config")
        .arg(cfg)
        .args(["check-config", "--online"])
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR");
    if let Some(f) = ssl_cert_file {
        c.env("SSL_CERT_FILE", f);
    }
    let o = c.output().await.unwrap();
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_is_trusted_through_ca_file_or_ssl_cert_file_and_only_then() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rec")).unwrap();
    let pki = make_pki(dir.path());
    let fake = FakeApi::start_tls(
        FakeOptions {
            token: TOKEN.into(),
            ..Default::default()
        },
        &pki.server_pem,
        &pki.server_key,
    )
    .await
    .unwrap();
    assert!(fake.base_url().starts_with("https://127.0.0.1:"));

    // Not trusted: a clear error, never a fallback to no verification.
    let cfg = crate::hardening::proc::write_config(dir.path(), &fake.base_url(), "");
    let (code, t) = check_online(&cfg, None).await;
    assert_ne!(code, Some(0), "{t}");
    assert!(t.contains("certificate is not trusted"), "{t}");
    assert!(t.contains("ca_file"), "says what to do: {t}");
    let api = ApiClient::new(
        &load_config(&std::fs::read_to_string(&cfg).unwrap()),
        Secret::new(TOKEN),
    )
    .unwrap();
    let e = api
        .declare(&declare_request(Some("a.wav")))
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Unreachable, "{e}");
    assert_eq!(fake.counters().requests, 0, "nothing was sent over it");

    // SSL_CERT_FILE, as curl and git read it.
    let (code, t) = check_online(&cfg, Some(&pki.ca_pem)).await;
    assert_eq!(code, Some(0), "{t}");
    assert!(t.contains("accepts the token"), "{t}");

    // [api] ca_file: the daemon uploads.
    let cfg = crate::hardening::proc::write_config(
        dir.path(),
        &fake.base_url(),
        &format!("[api]\nca_file = \"{}\"\n", pki.ca_pem.display()),
    );
    let (code, t) = check_online(&cfg, None).await;
    assert_eq!(code, Some(0), "{t}");
    let mut d = Daemon::spawn(&cfg, &dir.path().join("daemon.log"), &[]);
    d.wait_log("callferry running").await;
    let bytes = wav(0.5);
    std::fs::write(dir.path().join("rec/tls.wav"), &bytes).unwrap();
    let q = queue_when_ready(&dir.path().join("state/queue.db")).await;
    eventually("the upload over HTTPS", || async {
        q.counts().await.unwrap().uploaded == 1
    })
    .await;
    q.close().await;
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(DEADLINE).await.code(), Some(0));
    let stored: Vec<_> = fake
        .interactions()
        .into_iter()
        .flat_map(|i| i.uploads)
        .filter(|u| u.stored)
        .collect();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].sha256, sha256(&bytes));

    // A ca_file that cannot be used is a configuration error that names the key.
    for (what, path) in [
        ("missing", dir.path().join("nope.pem")),
        ("not PEM", dir.path().join("server.ext")),
    ] {
        let cfg = crate::hardening::proc::write_config(
            dir.path(),
            &fake.base_url(),
            &format!("[api]\nca_file = \"{}\"\n", path.display()),
        );
        let (code, t) = cli_text(&cfg, &["check-config"]).await;
        assert_eq!(code, Some(78), "{what}: {t}");
        assert!(t.contains("api.ca_file"), "{what}: {t}");
    }
}
