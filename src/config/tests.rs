use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::raw::KNOWN_KEYS;
use super::*;

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const MINIMAL: &str = r#"
        [api]
        token = "t0k3n"
        [watch]
        paths = ["/tmp/rec"]
    "#;

#[test]
fn minimal_config_gets_the_documented_defaults() {
    let c = from_toml_str(MINIMAL, &env(&[]), "test").unwrap();
    assert_eq!(c.api.base_url.as_str(), "https://api.elevateai.com/v1");
    assert_eq!(c.watch.settle, Duration::from_secs(5));
    assert_eq!(c.upload.workers, 4);
    assert_eq!(c.upload.max_attempts, 12);
    assert_eq!(c.upload.max_age, Duration::from_secs(7 * 86400));
    assert_eq!(
        c.queue.database,
        PathBuf::from("/var/lib/callferry/queue.db")
    );
    assert_eq!(c.after_upload.action, AfterUploadAction::Keep);
    assert!(c.watch.extensions.contains(&"wav".to_string()));
}

#[test]
fn unknown_key_is_named_with_its_section_and_a_suggestion() {
    let text = format!("{MINIMAL}\nsetle = \"3s\"\n");
    let err = from_toml_str(&text, &env(&[]), "test").unwrap_err();
    assert_eq!(err.key, "watch.setle");
    assert!(err.message.contains("did you mean `settle`"), "{err}");
}

#[test]
fn unknown_section_is_named() {
    let text = format!("{MINIMAL}\n[uplod]\nworkers = 2\n");
    let err = from_toml_str(&text, &env(&[]), "test").unwrap_err();
    assert_eq!(err.key, "uplod");
    assert!(err.message.contains("did you mean `upload`"), "{err}");
}

#[test]
fn a_postgres_url_selects_the_shared_queue_and_is_kept_secret() {
    for url in ["postgres://u:pw@db/callferry", "PostgreSQL://db/x"] {
        let text = format!("{MINIMAL}\n[queue]\ndatabase = \"{url}\"\n");
        let c = from_toml_str(&text, &env(&[]), "test").unwrap();
        assert_eq!(c.queue.postgres.as_ref().map(|s| s.expose()), Some(url));
        assert_eq!(
            c.queue.database,
            std::path::PathBuf::new(),
            "not a file path"
        );
        assert_eq!(c.queue.lease, std::time::Duration::from_secs(30));
        assert!(
            !format!("{c:?}").contains("pw"),
            "the password is not in Debug"
        );
    }
}

#[test]
fn the_postgres_queue_checks_its_keys_naming_the_key() {
    let url = "[queue]\ndatabase = \"postgres://db/x\"\n";
    // Results are followed on the shared queue too (by one daemon at a time).
    let text = format!("{MINIMAL}\n[results]\nenabled = true\n{url}");
    let c = from_toml_str(&text, &env(&[]), "test").unwrap();
    assert!(c.results.enabled && c.queue.postgres.is_some());
    let text = format!("{MINIMAL}\n[queue]\ndatabase = \"postgres://db/x\"\nlease = \"2s\"\n");
    let e = from_toml_str(&text, &env(&[]), "test").unwrap_err();
    assert_eq!(e.key, "queue.lease", "{e}");
    let text = format!("{MINIMAL}\n[queue]\ndatabase = \"postgres://u:pw@[db/x\"\n");
    let e = from_toml_str(&text, &env(&[]), "test").unwrap_err();
    assert_eq!(e.key, "queue.database", "{e}");
    assert!(!e.to_string().contains("pw"), "{e}");
}

#[test]
fn bad_duration_names_the_key() {
    let text = format!("{MINIMAL}\nsettle = \"5 parsecs\"\n");
    let err = from_toml_str(&text, &env(&[]), "test").unwrap_err();
    assert_eq!(err.key, "watch.settle");
}

#[test]
fn missing_token_and_paths_are_reported() {
    let err = from_toml_str("[watch]\npaths=[\"/x\"]\n", &env(&[]), "t").unwrap_err();
    assert_eq!(err.key, "api.token");
    let err = from_toml_str("[api]\ntoken=\"x\"\n", &env(&[]), "t").unwrap_err();
    assert_eq!(err.key, "watch.paths");
}

#[test]
fn environment_overrides_the_file() {
    let c = from_toml_str(
        MINIMAL,
        &env(&[
            ("CALLFERRY_UPLOAD__WORKERS", "9"),
            ("CALLFERRY_API__TOKEN", "12345"),
            ("CALLFERRY_WATCH__PATHS", "/a,/b"),
            ("CALLFERRY_RESULTS__ENABLED", "true"),
            ("CALLFERRY_CONFIG", "/etc/other.toml"),
        ]),
        "t",
    )
    .unwrap();
    assert_eq!(c.upload.workers, 9);
    assert_eq!(
        c.watch.paths,
        vec![PathBuf::from("/a"), PathBuf::from("/b")]
    );
    assert!(c.results.enabled);
    match c.api.token {
        TokenSource::Inline(s) => assert_eq!(s.expose(), "12345"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn unknown_env_key_is_an_error_too() {
    let err = from_toml_str(MINIMAL, &env(&[("CALLFERRY_UPLOAD__WORKRES", "2")]), "t").unwrap_err();
    assert_eq!(err.key, "upload.workres");
}

#[test]
fn plain_http_is_refused_unless_loopback_or_allowed() {
    let t = |url: &str, allow: bool| {
        from_toml_str(
            &format!(
                "[api]\ntoken=\"x\"\nbase_url=\"{url}\"\nallow_insecure_http={allow}\n[watch]\npaths=[\"/x\"]\n"
            ),
            &env(&[]),
            "t",
        )
    };
    assert!(t("http://127.0.0.1:8080/v1", false).is_ok());
    assert!(t("http://localhost:8080/v1", false).is_ok());
    assert!(t("http://[::1]:8080/v1", false).is_ok());
    assert_eq!(
        t("http://example.com/v1", false).unwrap_err().key,
        "api.base_url"
    );
    assert!(t("http://example.com/v1", true).is_ok());
    assert_eq!(
        t("ftp://example.com/v1", true).unwrap_err().key,
        "api.base_url"
    );
}

#[test]
fn debug_output_never_contains_the_token() {
    let c = from_toml_str(MINIMAL, &env(&[]), "t").unwrap();
    assert!(!format!("{c:?}").contains("t0k3n"));
}

#[test]
fn broken_toml_is_reported_as_such() {
    let err = from_toml_str("[api\ntoken=", &env(&[]), "my.toml").unwrap_err();
    assert_eq!(err.key, "my.toml");
    assert!(err.message.contains("not valid TOML"), "{err}");
}

#[test]
fn broken_toml_is_located_without_quoting_the_token() {
    let err = from_toml_str("[api]\ntoken = \"s3cr3t\" x\n", &env(&[]), "my.toml").unwrap_err();
    assert!(err.message.contains("line 2, column 18"), "{err}");
    assert!(!err.to_string().contains("s3cr3t"), "{err}");
}

#[test]
fn move_into_a_watched_folder_is_refused() {
    let text = format!("{MINIMAL}\n[after_upload]\naction=\"move\"\nmove_to=\"/tmp/rec/done\"\n");
    let err = from_toml_str(&text, &env(&[]), "t").unwrap_err();
    assert_eq!(err.key, "after_upload.move_to");
}

#[test]
fn the_shipped_example_config_is_valid_and_spells_out_the_defaults() {
    let text = include_str!("../../config/callferry.toml");
    let c = from_toml_str(text, &env(&[]), "config/callferry.toml").unwrap();
    let d = from_toml_str(MINIMAL, &env(&[]), "t").unwrap();
    assert_eq!(c.watch.settle, d.watch.settle);
    assert_eq!(c.upload.workers, d.upload.workers);
    assert_eq!(c.watch.extensions, d.watch.extensions);
    assert_eq!(c.watch.ignore, d.watch.ignore);
    assert_eq!(c.results.kinds, d.results.kinds);
    assert_eq!(c.queue.database, d.queue.database);
    assert!(matches!(c.api.token, TokenSource::File(_)));
    // Every known key appears in the example.
    for (section, keys) in KNOWN_KEYS.iter() {
        assert!(
            text.contains(&format!("[{section}]")),
            "[{section}] missing from the example"
        );
        for k in *keys {
            assert!(
                text.contains(&format!("{k} =")),
                "{section}.{k} missing from the example"
            );
        }
    }
}

#[test]
fn a_systemd_credential_is_the_token_when_none_is_configured() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "from-credential\n").unwrap();
    let creds = dir.path().to_string_lossy().into_owned();
    let only_paths = "[watch]\npaths=[\"/x\"]\n";
    let c = from_toml_str(only_paths, &env(&[("CREDENTIALS_DIRECTORY", &creds)]), "t").unwrap();
    match &c.api.token {
        TokenSource::File(p) => assert_eq!(p, &dir.path().join("token")),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(c.api.token.load().unwrap().expose(), "from-credential");
    // A token the configuration names wins.
    let c = from_toml_str(MINIMAL, &env(&[("CREDENTIALS_DIRECTORY", &creds)]), "t").unwrap();
    assert!(matches!(c.api.token, TokenSource::Inline(_)));
    // No credential file there: still the usual error naming api.token.
    let empty = tempfile::tempdir().unwrap();
    let e = from_toml_str(
        only_paths,
        &env(&[("CREDENTIALS_DIRECTORY", &empty.path().to_string_lossy())]),
        "t",
    )
    .unwrap_err();
    assert_eq!(e.key, "api.token");
}

#[test]
fn empty_token_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("token");
    std::fs::write(&f, "  \n").unwrap();
    let err = TokenSource::File(f.clone()).load().unwrap_err();
    assert_eq!(err.key, "api.token_file");
    std::fs::write(&f, "abc\n").unwrap();
    assert_eq!(TokenSource::File(f).load().unwrap().expose(), "abc");
}

#[test]
fn a_mistyped_log_level_is_refused_with_a_suggestion() {
    for (typo, meant) in [("warning", "warn"), ("inof", "info"), ("debugg", "debug")] {
        let text = format!("{MINIMAL}\n[log]\nlevel = \"{typo}\"\n");
        let e = from_toml_str(&text, &env(&[]), "t").unwrap_err();
        assert_eq!(e.key, "log.level");
        assert!(
            e.message.contains(&format!("did you mean `{meant}`")),
            "{typo}: {e}"
        );
    }
    for bad in ["", " , ", "callferry=loud", "nonsense"] {
        assert!(check_log_filter("RUST_LOG", bad).is_err(), "{bad:?}");
    }
    for good in [
        "info",
        "WARN",
        "off",
        "callferry=debug,warn",
        "callferry::worker=trace",
        "h2[stream{id=1}]=debug,info",
    ] {
        check_log_filter("RUST_LOG", good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
    }
}

#[test]
fn intervals_that_pace_requests_have_floors() {
    for (section, key, value) in [
        ("api", "pause_recheck", "0s"),
        ("api", "pause_recheck", "99ms"),
        ("api", "stall_timeout", "1ms"),
        ("upload", "backoff_initial", "1ns"),
        ("upload", "backoff_max", "50ms"),
        ("results", "poll_interval", "1ms"),
        ("watch", "poll_interval", "1ms"),
        ("watch", "rescan_interval", "10ms"),
    ] {
        let var = format!(
            "CALLFERRY_{}__{}",
            section.to_uppercase(),
            key.to_uppercase()
        );
        let vars = [("CALLFERRY_UPLOAD__BACKOFF_INITIAL", "10ms"), (&var, value)];
        let e = from_toml_str(MINIMAL, &env(&vars), "t").unwrap_err();
        assert_eq!(e.key, format!("{section}.{key}"), "{e}");
        assert!(e.message.contains("below the floor"), "{e}");
    }
    // Off is off, and the floors themselves are accepted.
    let ok = env(&[
        ("CALLFERRY_WATCH__POLL_INTERVAL", "0s"),
        ("CALLFERRY_WATCH__RESCAN_INTERVAL", "0"),
        ("CALLFERRY_API__PAUSE_RECHECK", "100ms"),
        ("CALLFERRY_UPLOAD__BACKOFF_INITIAL", "10ms"),
        ("CALLFERRY_UPLOAD__BACKOFF_MAX", "100ms"),
    ]);
    from_toml_str(MINIMAL, &ok, "t").unwrap();
    let e = from_toml_str(
        MINIMAL,
        &env(&[("CALLFERRY_RESULTS__MAX_REQUESTS_PER_SEC", "100000")]),
        "t",
    )
    .unwrap_err();
    assert_eq!(e.key, "results.max_requests_per_sec");
}

#[test]
fn the_known_keys_are_read_from_the_raw_structs() {
    let sections: Vec<&str> = KNOWN_KEYS.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        sections,
        [
            "api",
            "declare",
            "watch",
            "queue",
            "upload",
            "after_upload",
            "results",
            "metrics",
            "log"
        ]
    );
    let keys = |section: &str| KNOWN_KEYS.iter().find(|(s, _)| *s == section).unwrap().1;
    // Keys with a custom deserializer or an Option are there as well as plain ones.
    assert!(keys("api").contains(&"allow_insecure_http"));
    assert!(keys("api").contains(&"token_file"));
    assert!(keys("after_upload").contains(&"when"));
    assert_eq!(keys("queue"), ["database", "keep_history", "lease"]);
    // Every key is accepted as a key (its value may still be refused).
    for (section, keys) in KNOWN_KEYS.iter() {
        for key in *keys {
            let name = format!(
                "CALLFERRY_{}__{}",
                section.to_uppercase(),
                key.to_uppercase()
            );
            if let Err(e) = from_toml_str(MINIMAL, &env(&[(&name, "1")]), "t") {
                assert!(
                    !e.message.contains("unknown key"),
                    "{section}.{key} is refused as unknown: {e}"
                );
            }
        }
    }
}

#[test]
fn calls_keys_have_defaults_and_bad_values_name_their_key() {
    let c = from_toml_str(MINIMAL, &env(&[]), "test").unwrap();
    assert!(!c.declare.send_metadata);
    assert!(matches!(c.watch.naming, crate::calls::naming::Naming::Auto));
    let with = |extra: &str| from_toml_str(&format!("{MINIMAL}\n{extra}"), &env(&[]), "t");
    let err = with("[declare]\ntimezone = \"Mars/Olympus\"\n").unwrap_err();
    assert_eq!(err.key, "declare.timezone");
    assert!(err.to_string().contains("IANA"), "{err}");
    let ok = with("[declare]\ntimezone = \"America/Sao_Paulo\"\nsend_metadata = true\n").unwrap();
    assert!(ok.declare.send_metadata);
    let naming = |n: &str| {
        let text = format!("[api]\ntoken = \"t\"\n[watch]\npaths = [\"/r\"]\nnaming = '{n}'\n");
        from_toml_str(&text, &env(&[]), "t")
    };
    let err = naming("(?P<uid>[0-9]+").unwrap_err();
    assert_eq!(err.key, "watch.naming");
    let err = naming(r"^(?P<uid>[0-9]+)\.wav$").unwrap_err();
    assert!(err.to_string().contains("external_id"), "{err}");
    assert!(naming(r"^(?P<external_id>[0-9]+)\.wav$").is_ok());
}

const TWO_SOURCES: &str = r#"
        [api]
        token = "t0k3n"
        [declare]
        language_tag = "en-us"
        send_metadata = true
        [watch]
        paths = ["/rec/main"]
        naming = "freepbx"
        [[source]]
        name = "es-queue"
        paths = ["/rec/es"]
        [source.declare]
        language_tag = "es-us"
        [[source]]
        name = "tenant-b"
        paths = ["/rec/b", "/rec/b2"]
        token_file = "/etc/callferry/b.token"
        naming = "none"
    "#;

#[test]
fn sources_lay_their_declare_over_the_top_level_and_are_all_watched() {
    let c = from_toml_str(TWO_SOURCES, &env(&[]), "t").unwrap();
    let names: Vec<&str> = c.sources.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, [DEFAULT_SOURCE, "es-queue", "tenant-b"]);
    let es = c.source_named("es-queue").unwrap();
    assert_eq!(es.declare.language_tag, "es-us");
    assert!(es.declare.send_metadata, "other [declare] keys are kept");
    assert!(
        matches!(es.naming, crate::calls::naming::Naming::FreePbx),
        "naming defaults to [watch]'s"
    );
    assert!(es.token.is_none());
    let b = c.source_named("tenant-b").unwrap();
    assert_eq!(b.declare.language_tag, "en-us");
    assert!(matches!(b.naming, crate::calls::naming::Naming::None));
    assert!(matches!(b.token, Some(TokenSource::File(_))));
    assert_eq!(c.account_of(es), DEFAULT_SOURCE);
    assert_eq!(c.account_of(b), "tenant-b");
    assert_eq!(
        c.watch.paths,
        ["/rec/main", "/rec/es", "/rec/b", "/rec/b2"].map(PathBuf::from)
    );
    assert_eq!(
        c.source_of_root(std::path::Path::new("/rec/b2")).name,
        "tenant-b"
    );
    assert_eq!(
        c.source_of_root(std::path::Path::new("/gone")).name,
        DEFAULT_SOURCE
    );
}

#[test]
fn with_sources_the_watch_paths_may_be_empty() {
    let text = "[api]\ntoken = \"t\"\n[[source]]\nname = \"a\"\npaths = [\"/rec/a\"]\n";
    let c = from_toml_str(text, &env(&[]), "t").unwrap();
    assert!(c.sources[0].paths.is_empty());
    assert_eq!(c.watch.paths, [PathBuf::from("/rec/a")]);
}

#[test]
fn bad_sources_name_their_key() {
    let cases = [
        (
            "[[source]]\nname = \"a\"\npaths = [\"/rec/main/x\"]\n",
            "source[0].paths",
        ),
        (
            "[[source]]\nname = \"a\"\npaths = [\"/rec\"]\n",
            "source[0].paths",
        ),
        ("[[source]]\npaths = [\"/x\"]\n", "source[0].name"),
        (
            "[[source]]\nname = \"default\"\npaths = [\"/x\"]\n",
            "source[0].name",
        ),
        ("[[source]]\nname = \"a\"\n", "source[0].paths"),
        (
            "[[source]]\nname = \"a\"\npaths = [\"rel\"]\n",
            "source[0].paths",
        ),
        (
            "[[source]]\nname = \"a\"\npaths = [\"/x\"]\nnaming = \"(\"\n",
            "source[0].naming",
        ),
        (
            "[[source]]\nname = \"a\"\npaths = [\"/x\"]\n[source.declare]\ntimezone = \"Mars/Base\"\n",
            "source[0].declare.timezone",
        ),
        (
            "[[source]]\nname = \"a\"\npaths = [\"/x\"]\n[source.declare]\nlanguage_tag = 3\n",
            "source[0].declare.language_tag",
        ),
        ("[source]\nname = \"a\"\n", "source"),
    ];
    for (extra, key) in cases {
        let text = format!("{MINIMAL}\n[watch]\npaths = [\"/rec/main\"]\n{extra}")
            .replace("[watch]\n        paths = [\"/tmp/rec\"]", "");
        let err = from_toml_str(&text, &env(&[]), "t").unwrap_err();
        assert_eq!(err.key, key, "{extra}: {err}");
    }
    let err = from_toml_str(MINIMAL, &env(&[("CALLFERRY_SOURCE__NAME", "x")]), "t").unwrap_err();
    assert_eq!(err.key, "CALLFERRY_SOURCE__NAME");
}

#[test]
fn the_example_configs_source_uncommented_is_valid() {
    let text = include_str!("../../config/callferry.toml");
    let at = text.find("# [[source]]").expect("a [[source]] example");
    let uncommented: String = text[at..]
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let full = format!("{}{uncommented}\n", &text[..at]);
    let c = from_toml_str(&full, &env(&[]), "example").unwrap();
    let s = c.source_named("es-queue").unwrap();
    assert_eq!(s.declare.language_tag, "es-us");
    assert!(s.token.is_some());
}
