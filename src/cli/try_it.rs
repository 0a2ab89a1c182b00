//! `callferry demo` and `callferry fake-api`: trying callferry out with nothing set up. Neither
//! reads a configuration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::{EXIT_FAILURE, EXIT_OK, finish, init_logging, tell};
use crate::config::LogFormat;

pub(super) async fn demo(env: &BTreeMap<String, String>) -> i32 {
    init_logging(LogFormat::Text, "warn", env);
    finish(crate::demo::run(&mut std::io::stdout()).await)
}

pub(super) async fn fake_api(
    listen: SocketAddr,
    token: String,
    processing_time: Duration,
    tls_ca_out: Option<std::path::PathBuf>,
    env: &BTreeMap<String, String>,
) -> i32 {
    init_logging(LogFormat::Text, "info", env);
    let opts = callferry_fake::FakeOptions {
        token,
        processing_time,
        ..Default::default()
    };
    let scheme = if tls_ca_out.is_some() {
        "https"
    } else {
        "http"
    };
    let trust = tls_ca_out
        .as_ref()
        .map(|p| format!("; its CA: {}", p.display()))
        .unwrap_or_default();
    tell(&format!(
        "fake ElevateAI API on {scheme}://{listen}/v1 (control: {scheme}://{listen}/_fake/){trust}"
    ));
    match callferry_fake::serve_forever(listen, opts, tls_ca_out.as_deref()).await {
        Ok(()) => EXIT_OK,
        Err(e) => {
            tell(&format!("callferry: fake API: {e}"));
            EXIT_FAILURE
        }
    }
}
