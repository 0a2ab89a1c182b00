use super::body::{Progress, describe_body};
use super::*;

#[test]
fn classes() {
    let st = |s| ApiError::Status {
        status: s,
        message: String::new(),
        retry_after: None,
    };
    assert_eq!(st(401).class(), ErrorClass::Auth);
    assert_eq!(st(400).class(), ErrorClass::Rejected);
    assert_eq!(st(413).class(), ErrorClass::Rejected);
    assert_eq!(st(503).class(), ErrorClass::Transient);
    assert_eq!(st(429).class(), ErrorClass::RateLimited(None));
    assert_eq!(
        ApiError::Unreachable("refused".into()).class(),
        ErrorClass::Unreachable
    );
    assert_eq!(
        ApiError::Transport("reset".into()).class(),
        ErrorClass::Transient
    );
}

#[test]
fn bodies_are_described_for_people() {
    assert_eq!(
        describe_body(br#"{"message":"File too large"}"#, false),
        "File too large"
    );
    assert_eq!(
        describe_body(
            b"<html><head><title>502 Bad Gateway</title></head></html>",
            true
        ),
        "HTML error page \"502 Bad Gateway\""
    );
    assert_eq!(describe_body(b"", false), "");
    assert!(describe_body(b"oops\x00\x01", false).contains("oops"));
}

#[test]
fn time_spent_on_our_own_cap_is_not_a_stall() {
    let stall = Duration::from_secs(1);
    let p = Progress::new();
    p.touch();
    let later = Instant::now() + Duration::from_secs(10);
    assert!(p.stalled(stall, later));
    p.set_throttled(true);
    assert!(
        !p.stalled(stall, later),
        "waiting on the cap is not a stall"
    );
    p.set_throttled(false);
    assert!(
        !p.stalled(stall, Instant::now()),
        "the clock restarts after the wait"
    );
}

#[test]
fn ids_are_checked() {
    assert!(valid_id("4b1b2f5e-0000-4000-8000-000000000001"));
    assert!(!valid_id(""));
    assert!(!valid_id("../../etc/passwd"));
    assert!(!valid_id("a b"));
}

#[test]
fn the_wire_name_cannot_break_out_of_its_header() {
    use std::os::unix::ffi::OsStrExt;
    let p = Path::new(std::ffi::OsStr::from_bytes(b"/r/O\"Bri\xe9n\r\n\\x.wav"));
    assert_eq!(wire_name(p), "O_Bri\u{FFFD}n___x.wav");
    assert_eq!(wire_name(Path::new("/r/José.wav")), "José.wav");
}
