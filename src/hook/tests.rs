use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde_json::{Value, json};

use super::intake::list;
use super::vet::{ReadError, read_request};
use super::*;

fn req(meta: &[(&str, &str)]) -> Request {
    Request::new(
        Path::new("/rec/a.wav"),
        None,
        meta.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

#[test]
fn dotted_keys_become_sections_and_values_stay_exact() {
    let r = req(&[
        ("caller", "';$(touch /tmp/x)'"),
        ("agent.extension", "1001"),
        ("agent.name", "Zoë \"Z\" O'Brien"),
    ]);
    r.validate().unwrap();
    assert_eq!(
        Value::Object(r.metadata().unwrap()),
        json!({
            "caller": "';$(touch /tmp/x)'",
            "agent": { "extension": "1001", "name": "Zoë \"Z\" O'Brien" },
        })
    );
}

#[test]
fn bad_requests_say_why() {
    for (r, want) in [
        (req(&[("a b", "x")]), "letters, digits"),
        (req(&[("a..b", "x")]), "letters, digits"),
        (req(&[("a.b.c.d.e", "x")]), "sections"),
        (req(&[("k", "line\nbreak")]), "control character"),
        (req(&[("k", &"x".repeat(MAX_VALUE + 1))]), "more than"),
        (
            req(&[("agent", "x"), ("agent.id", "y")]),
            "value of its own",
        ),
        (
            Request::new(Path::new("rel/a.wav"), None, BTreeMap::new()),
            "not absolute",
        ),
        (
            Request::new(Path::new("/rec/../etc/a.wav"), None, BTreeMap::new()),
            "`..`",
        ),
        (
            Request::new(Path::new("/rec/a.wav"), Some(" ".into()), BTreeMap::new()),
            "empty",
        ),
        (
            Request {
                version: 2,
                ..req(&[])
            },
            "version 2",
        ),
    ] {
        let e = r.validate().expect_err(want).to_string();
        assert!(e.contains(want), "{e} (wanted {want})");
    }
    let many: Vec<(String, String)> = (0..=MAX_PAIRS)
        .map(|i| (format!("k{i}"), "v".into()))
        .collect();
    let r = Request::new(Path::new("/a.wav"), None, many.into_iter().collect());
    let e = r.validate().unwrap_err();
    assert_eq!(e, RequestError::TooManyPairs(MAX_PAIRS + 1));
    assert!(e.to_string().contains("meta pairs"), "{e}");
}

#[test]
fn percent_decoding_is_exact_and_strict() {
    assert_eq!(
        percent_decode("%27%3B%24%28touch%20%2Ftmp%2Fx%29%27").unwrap(),
        "';$(touch /tmp/x)'"
    );
    assert_eq!(percent_decode("+14155550123").unwrap(), "+14155550123");
    assert!(percent_decode("50%").is_err());
    assert!(percent_decode("%zz").is_err());
    assert!(percent_decode("%ff").is_err());
}

#[test]
fn the_hook_wins_section_by_section_and_metadata_needs_send_metadata() {
    let declare = || crate::api::DeclareRequest {
        kind: "audio".into(),
        language_tag: "en-us".into(),
        vertical: "default".into(),
        audio_transcription_mode: None,
        model: None,
        include_ai_results: false,
        original_filename: None,
        external_identifier: Some("from-name".into()),
        metadata: json!({"agent": {"extension": "1001"}, "direction": "inbound"})
            .as_object()
            .cloned(),
    };
    let h = req(&[("agent.name", "Bob"), ("direction", "outbound")]);
    let mut hc = h.call();
    hc.external_id = Some("crm-1".into());
    let mut d = declare();
    apply_to_declare(&hc, &mut d, true);
    assert_eq!(d.external_identifier.as_deref(), Some("crm-1"));
    assert_eq!(
        Value::Object(d.metadata.unwrap()),
        json!({"agent": {"extension": "1001", "name": "Bob"}, "direction": "outbound"})
    );
    let mut d = declare();
    d.metadata = None;
    apply_to_declare(&hc, &mut d, false);
    assert_eq!(d.external_identifier.as_deref(), Some("crm-1"));
    assert!(d.metadata.is_none());
}

#[test]
fn a_request_round_trips_through_the_folder_and_links_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let name = b"\xe9t\xe9.wav";
    let path = Path::new("/rec").join(OsStr::from_bytes(name));
    let r = Request::new(&path, Some("id-1".into()), BTreeMap::new());
    let written = submit(d.path(), &r).unwrap();
    let names = list(d.path()).unwrap();
    assert_eq!(names, vec![written.file_name().unwrap().to_os_string()]);
    let back = read_request(d.path(), &names[0]).1.unwrap();
    assert_eq!(back, r);
    assert_eq!(back.path(), path, "a non-UTF-8 name survives byte for byte");

    std::os::unix::fs::symlink(&written, d.path().join("link.req")).unwrap();
    let e = read_request(d.path(), OsStr::new("link.req"))
        .1
        .unwrap_err();
    assert!(matches!(e, ReadError::Symlink), "{e}");
    assert!(e.to_string().contains("symbolic link"), "{e}");
    std::fs::hard_link(&written, d.path().join("hard.req")).unwrap();
    let e = read_request(d.path(), OsStr::new("hard.req"))
        .1
        .unwrap_err();
    assert!(matches!(e, ReadError::Links(2)), "{e}");
    assert!(e.to_string().contains("hard links"), "{e}");
    std::fs::write(
        d.path().join("big.req"),
        vec![b' '; MAX_REQUEST as usize + 1],
    )
    .unwrap();
    let e = read_request(d.path(), OsStr::new("big.req")).1.unwrap_err();
    assert!(matches!(e, ReadError::TooBig(_)), "{e}");
    assert!(e.to_string().contains("more than"), "{e}");
    std::fs::write(
        d.path().join("extra.req"),
        br#"{"version":1,"path":"/a.wav","command":"rm -rf /"}"#,
    )
    .unwrap();
    let e = read_request(d.path(), OsStr::new("extra.req"))
        .1
        .unwrap_err();
    assert!(matches!(e, ReadError::NotJson(_)), "{e}");
    assert!(e.to_string().contains("unknown field"), "{e}");
    // Temporary files are not requests.
    std::fs::write(d.path().join(".tmp-x"), b"{").unwrap();
    assert!(!list(d.path()).unwrap().iter().any(|n| n == ".tmp-x"));
}

#[test]
fn a_missing_folder_is_the_admins_to_fix() {
    let d = tempfile::tempdir().unwrap();
    let r = req(&[]);
    match submit(&d.path().join("none"), &r) {
        Err(SubmitError::Setup(m)) => {
            assert!(
                m.contains("does not exist") && m.contains("install -d"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
}
