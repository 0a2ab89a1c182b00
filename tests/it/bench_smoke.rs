//! The benchmarks' CI smoke run: `callferry-bench --smoke` drives the real binaries (daemon and
//! fake as child processes) through all nine scenarios (8: the fake over HTTPS with a CA it made, trusted
//! through `[api] ca_file`) at tiny sizes. It checks that each works and
//! that every file arrives exactly once; it asserts nothing about speed, and needs no Python or curl.

use std::process::Command;

#[test]
fn benchmarks_smoke_run() {
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_callferry-bench"))
        .arg("--smoke")
        .arg("--callferry")
        .arg(env!("CARGO_BIN_EXE_callferry"))
        .arg("--workdir")
        .arg(work.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "callferry-bench --smoke failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    for scenario in [
        "| 1(i) |",
        "| 1(ii) |",
        "| 2 |",
        "| 3 |",
        "| 4 |",
        "| 5 |",
        "| 6 |",
        "| 7 |",
        "| 8 |",
        "| 9 |",
    ] {
        assert!(stdout.contains(scenario), "no {scenario} row in:\n{stdout}");
    }
}
