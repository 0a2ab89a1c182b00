//! Sources (`[[source]]`): folders with their own declare settings and ElevateAI account. Checked
//! from the fake's own records: which language each declare carried, on which account (token).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use callferry::app::{self, AppError, Handle};
use callferry::queue::Job;
use callferry_fake::{FakeApi, FakeOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// Tenant B's own ElevateAI token (the default source uses [`TOKEN`]).
const TOKEN_B: &str = "tenant-b-token-51c0";

/// A daemon whose `[watch] paths` is `rec/` (the default source, en-us) and with two sources:
/// `es` (`rec-es/`, es-us, the `[api]` token) and `tenant-b` (`rec-b/`, fr-fr, its own token
/// file).
struct Sources {
    dir: tempfile::TempDir,
    cfg: callferry::config::Config,
    fake: FakeApi,
    handle: Handle,
    shutdown: CancellationToken,
    daemon: Option<JoinHandle<Result<(), AppError>>>,
}

fn sources_toml(dir: &Path) -> String {
    format!(
        r#"
[[source]]
name = "es"
paths = ["{es}"]
[source.declare]
language_tag = "es-us"

[[source]]
name = "tenant-b"
paths = ["{b}"]
token_file = "{token_b}"
naming = "none"
[source.declare]
language_tag = "fr-fr"
vertical = "customer-service"
"#,
        es = dir.join("rec-es").display(),
        b = dir.join("rec-b").display(),
        token_b = dir.join("token-b").display(),
    )
}

impl Sources {
    async fn start() -> Sources {
        let dir = tempfile::tempdir().unwrap();
        for d in ["rec", "rec-es", "rec-b", "state"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("token-b"), format!("{TOKEN_B}\n")).unwrap();
        let fake = FakeApi::start(FakeOptions {
            token: TOKEN.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        fake.set_other_tokens(&[TOKEN_B]);
        let text = config_text(&fake.base_url(), dir.path(), "") + &sources_toml(dir.path());
        let started = Instant::now();
        loop {
            let cfg = load_config(&text);
            let shutdown = CancellationToken::new();
            let (tx, rx) = tokio::sync::oneshot::channel();
            let daemon = tokio::spawn(app::run(cfg, shutdown.clone(), Some(tx)));
            match tokio::time::timeout(DEADLINE, rx).await {
                Ok(Ok(handle)) => {
                    return Sources {
                        cfg: load_config(&text),
                        dir,
                        fake,
                        handle,
                        shutdown,
                        daemon: Some(daemon),
                    };
                }
                // As in helpers::launch: a parallel test's forked child may briefly share a lock.
                _ => match daemon.await {
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

    fn drop_file(&self, folder: &str, name: &str) -> PathBuf {
        let dest = self.dir.path().join(folder).join(name);
        let tmp = dest.with_file_name(format!(".{name}.part"));
        std::fs::write(&tmp, wav(0.3)).unwrap();
        std::fs::rename(&tmp, &dest).unwrap();
        dest
    }

    async fn job(&self, path: &Path) -> Option<Job> {
        self.handle
            .queue
            .list(None, 10_000)
            .await
            .unwrap()
            .into_iter()
            .find(|j| Path::new(&j.path) == path)
    }

    async fn wait_state(&self, path: &Path, state: &str) -> Job {
        poll_for(&format!("{} to be {state}", path.display()), || async {
            self.job(path)
                .await
                .filter(|j| j.state.public().as_str() == state)
        })
        .await
    }

    /// The declare bodies and accounts the fake received for a file name.
    fn declared(&self, name: &str) -> Vec<(serde_json::Value, String)> {
        self.fake
            .interactions()
            .into_iter()
            .filter(|i| i.declare_body["originalFilename"] == name)
            .map(|i| (i.declare_body, i.account))
            .collect()
    }

    async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(d) = self.daemon.take() {
            d.await.unwrap().expect("daemon stopped with an error");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_source_declares_with_its_own_settings_and_account() {
    let mut app = Sources::start().await;
    let name = "out-5551234-1001-20261201-101500-1764584100.42.wav";
    let a = app.drop_file("rec", "a.wav");
    let es = app.drop_file("rec-es", "b.wav");
    let b = app.drop_file("rec-b", name);
    for p in [&a, &es, &b] {
        app.wait_state(p, "uploaded").await;
    }
    let expect = [
        ("a.wav", "en-us", "default", TOKEN, "a.wav", "default"),
        ("b.wav", "es-us", "default", TOKEN, "b.wav", "es"),
        // tenant-b: naming = "none", so its id is the path, not the FreePBX uniqueid.
        (name, "fr-fr", "customer-service", TOKEN_B, name, "tenant-b"),
    ];
    for (file, lang, vertical, account, ext, source) in expect {
        let got = app.declared(file);
        assert_eq!(got.len(), 1, "{file} declared once: {got:?}");
        let (body, acct) = &got[0];
        assert_eq!(body["languageTag"], lang, "{file}: {body}");
        assert_eq!(body["vertical"], vertical, "{file}: {body}");
        assert_eq!(body["externalIdentifier"], ext, "{file}: {body}");
        assert_eq!(acct, account, "{file} declared on its source's account");
        let path = app.dir.path().join(match source {
            "default" => "rec",
            "es" => "rec-es",
            _ => "rec-b",
        });
        let job = app.job(&path.join(file)).await.unwrap();
        assert_eq!(job.source.as_deref(), Some(source), "{job:?}");
    }
    app.stop().await;
}

fn callferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_callferry"));
    c.env_remove("CALLFERRY_CONFIG").env_remove("RUST_LOG");
    c
}

/// Each bad `[[source]]` is exit 78 with the key it is about named.
#[test]
fn bad_sources_exit_78_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec");
    let base = config_text("http://127.0.0.1:9/v1", dir.path(), "");
    let cases: &[(&str, String, &[&str])] = &[
        (
            "a source inside the [watch] paths",
            format!(
                "[[source]]\nname = \"x\"\npaths = [\"{}/sub\"]\n",
                rec.display()
            ),
            &["source[0].paths", "watch.paths", "overlaps"],
        ),
        (
            "two sources sharing a folder",
            "[[source]]\nname = \"x\"\npaths = [\"/srv/a\"]\n\
             [[source]]\nname = \"y\"\npaths = [\"/srv/a/b\"]\n"
                .into(),
            &["source[1].paths", "source[0].paths", "/srv/a/b"],
        ),
        (
            "a duplicate name",
            "[[source]]\nname = \"x\"\npaths = [\"/srv/a\"]\n\
             [[source]]\nname = \"x\"\npaths = [\"/srv/b\"]\n"
                .into(),
            &["source[1].name", "source[0]"],
        ),
        (
            "an unknown key",
            "[[source]]\nname = \"x\"\npaths = [\"/srv/a\"]\ntokn_file = \"/t\"\n".into(),
            &["source[0].tokn_file", "did you mean `token_file`"],
        ),
        (
            "an unknown declare key",
            "[[source]]\nname = \"x\"\npaths = [\"/srv/a\"]\n[source.declare]\nlanguage = \"es\"\n"
                .into(),
            &["source[0].declare.language"],
        ),
        (
            "a token file that cannot be read",
            "[[source]]\nname = \"x\"\npaths = [\"/srv/a\"]\ntoken_file = \"/nonexistent/t\"\n"
                .into(),
            &["source[0].token_file", "/nonexistent/t"],
        ),
        (
            "a name that is no label",
            "[[source]]\nname = \"a b\"\npaths = [\"/srv/a\"]\n".into(),
            &["source[0].name"],
        ),
    ];
    for (what, extra, needles) in cases {
        let p = dir.path().join("callferry.toml");
        std::fs::write(&p, format!("{base}{extra}")).unwrap();
        let out = callferry()
            .arg("--config")
            .arg(&p)
            .arg("check-config")
            .output()
            .unwrap();
        // A load error is on stderr; check-config's own findings on stdout.
        let err = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(78), "{what}: {err}");
        for n in *needles {
            assert!(err.contains(n), "{what}: {n:?} not in {err}");
        }
    }
}

/// Tenant B's token is rejected: only tenant B's recordings wait (no attempt counted, nothing
/// failed, `status` names the source), while the default and `es` sources keep uploading. Fixing
/// tenant B's token file resumes it without a restart, and every recording is stored once, on its
/// own account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_on_one_source_pauses_only_that_source() {
    let mut app = Sources::start().await;
    // Tenant B's account stops accepting its token.
    app.fake.set_other_tokens(&[]);
    let b1 = app.drop_file("rec-b", "b1.wav");
    eventually("tenant-b to be paused", || async {
        app.handle
            .gate
            .state()
            .accounts_paused
            .contains_key("tenant-b")
    })
    .await;
    // Meanwhile the other sources go on, one after another.
    let mut others = Vec::new();
    for i in 0..3 {
        let a = app.drop_file("rec", &format!("a{i}.wav"));
        let e = app.drop_file("rec-es", &format!("e{i}.wav"));
        app.wait_state(&a, "uploaded").await;
        app.wait_state(&e, "uploaded").await;
        others.extend([a, e]);
    }
    let b2 = app.drop_file("rec-b", "b2.wav");
    let status = open_queue(&app.dir.path().join("state/queue.db")).await;
    let report = poll_for("status to show tenant-b paused", || async {
        let db = app.dir.path().join("state/queue.db");
        let r = callferry::status::gather_for(&status, &db, Some(&app.cfg))
            .await
            .unwrap();
        r.sources
            .iter()
            .any(|s| s.name == "tenant-b" && s.paused.is_some())
            .then_some(r)
    })
    .await;
    assert!(report.paused, "{report:?}");
    let by_name = |n: &str| report.sources.iter().find(|s| s.name == n).unwrap();
    assert!(by_name("default").paused.is_none(), "{report:?}");
    assert!(by_name("es").paused.is_none(), "{report:?}");
    for p in [&b1, &b2] {
        let j = poll_for("tenant-b's recording queued", || app.job(p)).await;
        assert_eq!(j.state.public().as_str(), "pending", "{j:?}");
        assert_eq!(j.attempts, 0, "no attempt counted while paused: {j:?}");
    }
    assert!(
        app.declared("b1.wav").is_empty(),
        "nothing of tenant-b's declared while its token is rejected"
    );

    // The account takes its token again (the operator fixed it): no restart needed.
    app.fake.set_other_tokens(&[TOKEN_B]);
    for p in [&b1, &b2] {
        app.wait_state(p, "uploaded").await;
    }
    for p in others.iter().chain([&b1, &b2]) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let got = app.declared(&name);
        assert_eq!(got.len(), 1, "{name} declared once: {got:?}");
        let want = if p.starts_with(app.dir.path().join("rec-b")) {
            TOKEN_B
        } else {
            TOKEN
        };
        assert_eq!(got[0].1, want, "{name} on its source's account");
        let iid = app.job(p).await.unwrap().interaction_id.unwrap();
        let rec = app
            .fake
            .interactions()
            .into_iter()
            .find(|i| i.id == iid)
            .unwrap();
        assert_eq!(rec.uploads.iter().filter(|u| u.stored).count(), 1, "{name}");
    }
    assert!(app.handle.gate.state().shown().is_none());
    // The metrics say whose uploads went and whose were refused.
    let m = &app.handle.metrics;
    assert!(m.uploads_with_outcome("unauthorized", "tenant-b") >= 1);
    assert_eq!(m.uploads_with_outcome("unauthorized", "default"), 0);
    assert_eq!(m.uploads_with_outcome("unauthorized", "es"), 0);
    assert_eq!(m.uploads_with_outcome("created", "es"), 3);
    assert_eq!(m.uploads_with_outcome("created", "tenant-b"), 2);
    app.stop().await;
}
