//! Calls, not files: each declare carries the call's identity from the recorder's naming
//! convention (externalIdentifier) and, with `send_metadata`, its facts as ElevateAI metadata.
//! Checked from the fake's own records of the declare bodies it received.

use serde_json::json;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freepbx_recording_is_declared_as_its_call_with_utc_metadata() {
    let mut app =
        TestApp::start("[declare]\nsend_metadata = true\ntimezone = \"Europe/Paris\"\n").await;
    app.fake.set_explore(true);
    let name = "in-8005550100-+14155550123-20260701-101500-1782893700.17.wav";
    let a = wav(0.3);
    let p = app.drop_file(&format!("2026/07/01/{name}"), &a);
    // A FusionPBX uuid and a name of no convention, beside it.
    let uuid = "6f1c2a9e-3b4d-4e5f-8a7b-0c1d2e3f4a5b";
    let q = app.drop_file(&format!("{uuid}.wav"), &wav(0.3));
    let r = app.drop_file("site-a/meeting.wav", &wav(0.3));
    for path in [&p, &q, &r] {
        app.wait_state(path, "uploaded").await;
    }
    let bodies = declare_body_of(&app, name);
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert_eq!(bodies[0]["externalIdentifier"], "1782893700.17");
    // 10:15 in Paris in July (CEST, UTC+2) is 08:15 UTC.
    assert_eq!(
        bodies[0]["metadata"],
        json!({
            "direction": "inbound",
            "recorded": "2026-07-01T08:15:00Z",
            "customer": { "phoneNumber": "+14155550123" },
            "agent": { "extension": "8005550100" },
        })
    );
    let fusion = declare_body_of(&app, &format!("{uuid}.wav"));
    assert_eq!(fusion[0]["externalIdentifier"], uuid);
    assert!(fusion[0].get("metadata").is_none(), "{fusion:?}");
    let plain = declare_body_of(&app, "meeting.wav");
    assert_eq!(plain[0]["externalIdentifier"], "site-a/meeting.wav");
    println!(
        "declare body for a FreePBX recording: {}",
        serde_json::to_string(&bodies[0]).unwrap()
    );
    app.stop().await;
}

/// Metadata is off by default: the declare carries the id but no metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_send_metadata_only_the_id_goes_out() {
    let mut app = TestApp::start("").await;
    let name = "out-5551234-1001-20261201-101500-1764584100.42.wav";
    let p = app.drop_file(name, &wav(0.3));
    app.wait_state(&p, "uploaded").await;
    let bodies = declare_body_of(&app, name);
    assert_eq!(bodies[0]["externalIdentifier"], "1764584100.42");
    assert!(bodies[0].get("metadata").is_none(), "{bodies:?}");
    app.stop().await;
}

/// An account without Explore refuses metadata with a 400: the job fails with a reason that names
/// `send_metadata`, nothing was created, and `retry` after the fix declares it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metadata_refusal_names_send_metadata_and_retry_declares_once() {
    let mut app = TestApp::start("[declare]\nsend_metadata = true\n").await;
    let name = "out-5551234-1001-20261201-101500-1764584100.42.wav";
    let p = app.drop_file(name, &wav(0.3));
    let job = app.wait_state(&p, "failed").await;
    let why = job.last_error.unwrap();
    assert!(
        why.contains("send_metadata = false") && why.contains("Explore"),
        "{why}"
    );
    assert_eq!(app.fake.interactions().len(), 0);
    app.fake.set_explore(true);
    let q = open_queue(&app.db_path()).await;
    assert_eq!(
        q.retry(Some(&[job.id]), callferry::clock::now_ms())
            .await
            .unwrap(),
        1
    );
    q.close().await;
    app.wait_state(&p, "uploaded").await;
    assert_eq!(declare_body_of(&app, name).len(), 1);
    assert_eq!(app.fake.counters().uploads_stored, 1);
    app.stop().await;
}

/// Results join the call without the database: one index line per processed recording, with its
/// external id, interaction id and result files; `list --json` rows carry `external_id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processed_calls_are_indexed_with_their_ids_and_result_files() {
    let out = tempfile::tempdir().unwrap();
    let mut app = TestApp::start(&format!(
        "[results]\nenabled = true\noutput_dir = \"{}\"\npoll_interval = \"200ms\"\n",
        out.path().display()
    ))
    .await;
    let name = "out-5551234-1001-20261201-101500-1764584100.42.wav";
    let p = app.drop_file(&format!("2026/12/01/{name}"), &wav(0.3));
    let q = app.drop_file("meeting.wav", &wav(0.3));
    let jp = app.wait_state(&p, "processed").await;
    let jq = app.wait_state(&q, "processed").await;
    assert_eq!(jp.external_id.as_deref(), Some("1764584100.42"));
    assert_eq!(jq.external_id.as_deref(), Some("meeting.wav"));

    let text = std::fs::read_to_string(out.path().join("index.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    for (job, ext) in [(&jp, "1764584100.42"), (&jq, "meeting.wav")] {
        let line = lines
            .iter()
            .find(|l| l["interaction_id"] == job.interaction_id.clone().unwrap().as_str())
            .unwrap_or_else(|| panic!("no line for {ext}:\n{text}"));
        assert_eq!(line["external_id"], ext);
        assert_eq!(line["path"], job.display_path());
        let files = line["results"].as_array().unwrap();
        assert!(!files.is_empty(), "{line}");
        for f in files {
            assert!(std::path::Path::new(f.as_str().unwrap()).is_file(), "{f}");
        }
    }
    let rows: serde_json::Value =
        serde_json::from_str(&callferry::status::list_json(&app.jobs().await)).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == jp.id)
        .unwrap();
    assert_eq!(row["external_id"], "1764584100.42");
    assert!(row.get("source").is_some(), "{row}");
    app.stop().await;
}

/// A sidecar that lands after its audio still counts (one declare, with its id and metadata); a
/// recording without one goes after the wait with its name's id; a malformed one is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_sidecar_is_waited_for_and_wins_over_the_name() {
    let mut app = TestApp::start(
        // Long enough that a loaded machine writes the late sidecar within it.
        "[declare]\nsend_metadata = true\ntimezone = \"UTC\"\n[watch]\nsidecar_wait = \"12s\"\n",
    )
    .await;
    app.fake.set_explore(true);
    let late = "out-5551234-1001-20261201-101500-1764584100.42.wav";
    let alone = "out-5559999-1002-20261201-101600-1764584160.43.wav";
    let broken = "in-5550000-1003-20261201-101700-1764584220.44.wav";
    let p_late = app.drop_file(late, &wav(0.3));
    let p_alone = app.drop_file(alone, &wav(0.3));
    std::fs::write(app.rec.join(broken.replace(".wav", ".json")), b"{oops").unwrap();
    let p_broken = app.drop_file(broken, &wav(0.3));
    // The sidecar lands once the recording is queued (as a CRM hook writes it after the call).
    poll_for("the late one queued", || async {
        app.job_for(&p_late).await
    })
    .await;
    std::fs::write(
        app.rec.join(late.replace(".wav", "_metadata.json")),
        br#"{"externalIdentifier":"crm-case-981","metadata":{"agent":{"id":"alice"},"category":"billing"}}"#,
    )
    .unwrap();
    for p in [&p_late, &p_alone, &p_broken] {
        app.wait_state(p, "uploaded").await;
    }
    let bodies = declare_body_of(&app, late);
    assert_eq!(bodies.len(), 1, "one declare: {bodies:?}");
    assert_eq!(bodies[0]["externalIdentifier"], "crm-case-981");
    let m = &bodies[0]["metadata"];
    assert_eq!(m["category"], "billing");
    assert_eq!(
        m["agent"],
        json!({ "id": "alice" }),
        "the sidecar's section wins: {m}"
    );
    assert_eq!(m["direction"], "outbound", "the name's facts stay: {m}");
    let alone_body = declare_body_of(&app, alone);
    assert_eq!(alone_body.len(), 1);
    assert_eq!(alone_body[0]["externalIdentifier"], "1764584160.43");
    let broken_body = declare_body_of(&app, broken);
    assert_eq!(broken_body[0]["externalIdentifier"], "1764584220.44");
    // Sidecars are never uploaded themselves.
    assert_eq!(app.fake.interactions().len(), 3);
    app.stop().await;
}
