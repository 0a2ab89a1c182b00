//! Flow control: our own bandwidth cap is not a stall, a 5xx storm closes the gate like an outage
//! (circuit breaker with one probe at a time), and repeated conditions are logged once.

use crate::helpers::*;

/// A throttled upload is not a stalled one: files of three chunks each, two uploading at once on a
/// cap where every chunk waits about 2 s for its turn, with `stall_timeout` at 1 s. Before, each
/// attempt was aborted at its second chunk and restarted from byte 0 until the attempts ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_slower_than_the_stall_timeout_because_of_our_own_cap_complete() {
    let mut app = TestApp::start(
        r#"
[api]
stall_timeout = "1s"
[upload]
workers = 2
max_bytes_per_sec = 262144
max_attempts = 2
"#,
    )
    .await;
    // 768 KiB: three 256 KiB chunks, so two of them wait on the cap.
    let a = wav(48.0);
    let b = wav(47.5);
    let pa = app.drop_file("a.wav", &a);
    let pb = app.drop_file("b.wav", &b);
    for (p, bytes) in [(&pa, &a), (&pb, &b)] {
        let job = app.wait_state(p, "uploaded").await;
        assert_eq!(job.attempts, 0, "no attempt was aborted: {job:?}");
        app.assert_uploaded_once(&job, bytes);
        let rec = app.interaction(job.interaction_id.as_deref().unwrap());
        assert_eq!(
            rec.uploads.len(),
            1,
            "one upload request, not restarts from byte 0: {:?}",
            rec.uploads
        );
    }
    app.stop().await;
}
