use super::failure::declare_may_have_created;
use super::*;
use crate::dispose::tests::job_for;
use crate::policy::Failure;

#[test]
fn the_text_log_names_the_interaction_once() {
    use std::sync::{Arc, Mutex};
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let sink = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        // A new recording: no id at the claim, recorded after the declare.
        let mut j = job_for(&std::env::current_exe().unwrap(), "x");
        j.interaction_id = None;
        let span = job_span(&j, "default");
        span.record("interaction_id", "iid-new");
        span.in_scope(|| info!("uploaded"));
        // A recording declared earlier: the id from the start.
        j.interaction_id = Some("iid-old".into());
        job_span(&j, "default").in_scope(|| info!("uploaded"));
    });
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    for (l, iid) in lines.iter().zip(["iid-new", "iid-old"]) {
        assert_eq!(l.matches("interaction_id=").count(), 1, "{l}");
        assert!(l.contains(&format!("interaction_id=\"{iid}\"")), "{l}");
    }
}

#[test]
fn running_out_of_descriptors_is_its_own_class() {
    let os = |n| std::io::Error::from_raw_os_error(n).to_string();
    let is_emfile = |e: &ApiError| Failure::of(e) == Failure::Descriptors;
    // As the API client reports a socket that could not be opened, and a recording.
    assert!(is_emfile(&ApiError::Unreachable(format!(
        "error sending request: client error (Connect): tcp open error: {}",
        os(libc::EMFILE)
    ))));
    assert!(is_emfile(&ApiError::Local(format!(
        "/rec/a.wav: {}",
        os(libc::ENFILE)
    ))));
    assert!(!is_emfile(&ApiError::Unreachable(format!(
        "tcp connect error: {}",
        os(libc::ECONNREFUSED)
    ))));
    assert!(!is_emfile(&ApiError::Local(format!(
        "/rec/a.wav: {}",
        os(libc::ENOENT)
    ))));
    // Nothing was sent: not a lost declare answer either.
    assert!(!declare_may_have_created(&ApiError::Unreachable(os(
        libc::EMFILE
    ))));
}
