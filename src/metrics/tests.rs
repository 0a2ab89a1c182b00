use super::*;

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_cluster_member_labels_every_series_with_its_name_and_shows_its_roles() {
    let m = Metrics::for_member("rec-host-2");
    m.files_discovered(1);
    let snap = Snapshot {
        roles: vec![("rescan", true), ("results", false), ("prune", false)],
        ..Snapshot::default()
    };
    let t = m.render(&snap);
    let samples: Vec<&str> = t.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(!samples.is_empty());
    for l in &samples {
        assert!(
            l.contains("daemon=\"rec-host-2\""),
            "a series without the daemon: {l}"
        );
    }
    assert_eq!(
        value(
            &t,
            "callferry_role_held{daemon=\"rec-host-2\",role=\"rescan\"}"
        ),
        Some(1.0),
        "{t}"
    );
    assert_eq!(
        value(
            &t,
            "callferry_role_held{daemon=\"rec-host-2\",role=\"results\"}"
        ),
        Some(0.0)
    );
    // One host's queue: no daemon label, no roles (the series stay as they always were).
    let t = Metrics::new().render(&Snapshot::default());
    assert!(!t.contains("daemon=") && !t.contains("callferry_role_held"));
}

#[test]
fn names_follow_prometheus_conventions_and_every_family_has_help() {
    let m = Metrics::new();
    let text = m.render(&Snapshot::default());
    for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
        let mut parts = line.split(' ').skip(2);
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        assert!(name.starts_with("callferry_"), "{line}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()),
            "{line}"
        );
        if kind == "counter" {
            assert!(name.ends_with("_total"), "{line}");
        }
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no help for {name}"
        );
    }
    for n in [
        "callferry_files_discovered_total",
        "callferry_uploads_total",
        "callferry_uploaded_bytes_total",
        "callferry_upload_duration_seconds",
        "callferry_jobs",
        "callferry_oldest_pending_job_age_seconds",
        "callferry_api_paused",
        "callferry_watcher_rescans_total",
        "callferry_watcher_overflows_total",
        "callferry_results_fetched_total",
        "callferry_orphan_declares_total",
    ] {
        assert!(text.contains(&format!("# TYPE {n} ")), "{n} missing");
    }
}

#[test]
fn events_and_snapshot_show_up_in_the_text() {
    let m = Metrics::new();
    m.files_discovered(3);
    m.add_sources(&["tenant-b"]);
    m.uploaded("default", 201, 1000, Duration::from_millis(300));
    m.uploaded("default", 409, 1000, Duration::from_millis(300));
    m.uploaded("tenant-b", 201, 500, Duration::from_millis(300));
    for status in [503, 401] {
        m.attempt_failed(
            "default",
            crate::api::ApiError::Status {
                status,
                message: "x".into(),
                retry_after: None,
            }
            .outcome(),
        );
    }
    m.watcher_rescan();
    m.watcher_overflow();
    let snap = Snapshot {
        counts: Counts {
            pending: 2,
            uploaded: 5,
            ..Default::default()
        },
        oldest_pending_age_s: Some(12.5),
        paused: true,
        orphan_declares: 4,
        roles: Vec::new(),
    };
    let t = m.render(&snap);
    assert_eq!(value(&t, "callferry_orphan_declares_total"), Some(4.0));
    assert_eq!(value(&t, "callferry_files_discovered_total"), Some(3.0));
    assert_eq!(
        value(
            &t,
            "callferry_uploads_total{outcome=\"created\",source=\"default\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &t,
            "callferry_uploads_total{outcome=\"conflict\",source=\"default\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &t,
            "callferry_uploads_total{outcome=\"retry\",source=\"default\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &t,
            "callferry_uploads_total{outcome=\"unauthorized\",source=\"default\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &t,
            "callferry_uploads_total{outcome=\"rejected\",source=\"default\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        value(&t, "callferry_uploaded_bytes_total{source=\"default\"}"),
        Some(1000.0)
    );
    // Another source's series: its own, and there from the start for every outcome.
    assert_eq!(
        value(
            &t,
            "callferry_uploads_total{outcome=\"created\",source=\"tenant-b\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &t,
            "callferry_uploads_total{outcome=\"retry\",source=\"tenant-b\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        value(&t, "callferry_uploaded_bytes_total{source=\"tenant-b\"}"),
        Some(500.0)
    );
    assert_eq!(
        value(&t, "callferry_upload_duration_seconds_count"),
        Some(2.0)
    );
    assert_eq!(value(&t, "callferry_jobs{state=\"pending\"}"), Some(2.0));
    assert_eq!(value(&t, "callferry_jobs{state=\"uploaded\"}"), Some(5.0));
    assert_eq!(value(&t, "callferry_jobs{state=\"failed\"}"), Some(0.0));
    assert_eq!(
        value(&t, "callferry_oldest_pending_job_age_seconds"),
        Some(12.5)
    );
    assert_eq!(value(&t, "callferry_api_paused"), Some(1.0));
    assert_eq!(value(&t, "callferry_watcher_rescans_total"), Some(1.0));
    assert_eq!(value(&t, "callferry_watcher_overflows_total"), Some(1.0));
}

#[test]
fn progress_and_beats_are_separate() {
    let p = Progress::default();
    p.beat();
    assert!(p.since_beat() < Duration::from_secs(1));
    p.progress();
    assert!(p.since_progress() < Duration::from_secs(1));
}

#[test]
fn a_parked_idle_worker_is_a_sign_of_life_without_waking() {
    let p = Progress {
        base: Instant::now() - Duration::from_secs(3600),
        ..Progress::default()
    };
    assert!(p.since_beat() >= Duration::from_secs(3600));
    let parked = p.park();
    assert_eq!(p.since_beat(), Duration::ZERO);
    let g = p.generation();
    drop(parked);
    assert!(p.since_beat() < Duration::from_secs(60), "unparking beats");
    assert_ne!(p.generation(), g, "and is a new generation");
}
