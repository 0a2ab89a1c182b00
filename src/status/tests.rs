use super::*;

fn report() -> StatusReport {
    StatusReport {
        counts: Counts {
            pending: 3,
            uploading: 1,
            uploaded: 1203,
            failed: 1,
            ..Default::default()
        },
        paused: true,
        pause_reason: Some("API token rejected: HTTP 401: bad token".into()),
        oldest_pending_age_s: Some(125.0),
        daemon_running: Some(true),
        last_error: Some("HTTP 503: injected 503".into()),
        recent_errors: vec![RecentError {
            job_id: 17,
            path: "/var/spool/asterisk/monitor/a.wav".into(),
            error: "HTTP 503: injected 503".into(),
            at: now_ms() - 180_000,
        }],
        database: "/var/lib/callferry/queue.db".into(),
        orphan_declares: 2,
        pending_forgets: 1,
        forget_error: Some("HTTP 503: injected 503".into()),
        folders_not_answering: Vec::new(),
        sources: Vec::new(),
        last_hour: (42, 325_000_000),
        cluster: Vec::new(),
    }
}

#[test]
fn the_table_reads_well_without_colour() {
    let t = render_text(&report(), Style { colour: false });
    assert!(!t.contains('\x1b'), "no escapes off a terminal: {t}");
    assert!(t.contains("uploads     PAUSED: API token rejected"), "{t}");
    assert!(t.contains("last hour   42 uploaded, 309.9 MiB"), "{t}");
    assert!(t.contains("oldest      waiting for 2m05s"), "{t}");
    assert!(t.contains("orphans     2 declare(s)"), "{t}");
    assert!(
        t.contains("forgets     1 call not finished (last failure: HTTP 503: injected 503)"),
        "{t}"
    );
    assert!(t.contains("uploaded        1203"), "{t}");
    assert!(t.contains("failed             1"), "{t}");
    assert!(
        t.contains(
            "#17     3m00s ago  /var/spool/asterisk/monitor/a.wav\n                   HTTP 503"
        ),
        "{t}"
    );
    let json = serde_json::to_value(report()).unwrap();
    assert!(json.get("last_hour").is_none(), "--json keeps its shape");
    assert_eq!(json["orphan_declares"], 2);
    assert_eq!(json["pending_forgets"], 1);
}

#[test]
fn colour_only_when_asked() {
    let t = render_text(&report(), Style { colour: true });
    assert!(t.contains("\x1b[1;31mPAUSED:\x1b[0m"), "{t}");
}

#[test]
fn the_streamed_json_list_is_the_array_serde_would_write() {
    let job = |id: i64| Job {
        id,
        path: format!("/rec/{id}.wav"),
        root: "/rec".into(),
        size: 10,
        mtime_ns: 1,
        dev: 1,
        ino: id as u64,
        state: crate::queue::State::Failed,
        attempts: 2,
        next_attempt_at: 0,
        interaction_id: Some("x\"y".into()),
        upload_status: None,
        last_error: Some("multi\nline".into()),
        created_at: 0,
        updated_at: 0,
        uploaded_at: None,
        follow_at: None,
        follow_attempts: 0,
        service_status: None,
        results_written: vec!["transcript".into()],
        orphans: 0,
        external_id: None,
        source: None,
        hook: None,
        held_by: None,
    };
    for n in [0, 1, 3] {
        let jobs: Vec<Job> = (1..=n).map(job).collect();
        let rows: Vec<ListRow> = jobs.iter().map(list_row).collect();
        assert_eq!(
            list_json(&jobs),
            serde_json::to_string_pretty(&rows).unwrap(),
            "{n} rows"
        );
    }
}

#[test]
fn bytes_read_well() {
    assert_eq!(human_bytes(512), "512 B");
    assert_eq!(human_bytes(1536), "1.5 KiB");
    assert_eq!(human_bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
}

#[test]
fn ages_read_well() {
    assert_eq!(human_age(5.2), "5s");
    assert_eq!(human_age(125.0), "2m05s");
    assert_eq!(human_age(7300.0), "2h01m");
    assert_eq!(human_age(90000.0), "1d01h");
}
