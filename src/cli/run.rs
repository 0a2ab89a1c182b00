//! `callferry run`: the daemon in the foreground, under signals. SIGTERM/SIGINT stop it gracefully;
//! SIGHUP re-reads the log level and the token.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;

use super::EXIT_OK;
use super::logging::{LOG_FILTER, log_filter};
use crate::app::{self, AppError};
use crate::config::{self, Config};

pub(super) async fn run_daemon(
    cfg: Config,
    config_path: PathBuf,
    env: BTreeMap<String, String>,
) -> Result<i32, AppError> {
    use tokio::signal::unix::{SignalKind, signal};
    let shutdown = CancellationToken::new();
    // Installed before anything else happens: until then SIGHUP's default action kills the
    // process (exit 129, no graceful stop, no log line).
    let catch = |kind| signal(kind).map_err(AppError::Signals);
    let (mut term, mut int, mut hup) = (
        catch(SignalKind::terminate())?,
        catch(SignalKind::interrupt())?,
        catch(SignalKind::hangup())?,
    );
    let (started_tx, mut started_rx) = tokio::sync::oneshot::channel();
    let token = cfg.api.token.clone();
    let sources = cfg.sources.clone();
    let s = shutdown.clone();
    tokio::spawn(async move {
        let mut handle: Option<app::Handle> = None;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => {
                    reload(&config_path, &env, &token, handle.as_ref());
                    if let Some(h) = &handle {
                        reload_tenants(&sources, h);
                    }
                    continue;
                }
                h = &mut started_rx, if handle.is_none() => {
                    handle = h.ok();
                    continue;
                }
            };
            if s.is_cancelled() {
                tracing::info!(
                    "{name} received; already stopping (in-flight uploads get until the end of upload.shutdown_grace)"
                );
            } else {
                tracing::info!("{name} received");
                s.cancel();
            }
        }
    });
    app::run(cfg, shutdown, Some(started_tx)).await?;
    Ok(EXIT_OK)
}

/// SIGHUP: each source with a token of its own reads it again (as `api.token_file`).
fn reload_tenants(sources: &[config::SourceConfig], handle: &app::Handle) {
    for (i, s) in sources.iter().enumerate() {
        let (Some(api), Some(token)) = (handle.tenants.get(&s.name), s.load_token(i)) else {
            continue;
        };
        match token {
            Ok(t) => {
                api.set_token(t);
                tracing::info!(source = %s.name, "SIGHUP: the source's token re-read");
            }
            Err(e) => {
                tracing::warn!(source = %s.name, error = %e, "SIGHUP: cannot read the source's token; keeping the current one")
            }
        }
    }
    handle.auth_recheck.notify_one();
}

/// SIGHUP: the log level from the config file (unless `RUST_LOG` decides it) and the token from
/// its file are read again; a daemon paused by a 401 then re-checks the token at once. Any other
/// change to the configuration needs a restart.
fn reload(
    path: &Path,
    env: &BTreeMap<String, String>,
    token: &config::TokenSource,
    handle: Option<&app::Handle>,
) {
    use tracing::{error, info, warn};
    match config::load(path, env) {
        Err(e) => {
            error!(error = %e, "SIGHUP: the configuration has an error; the log level is unchanged")
        }
        Ok(_) if env.contains_key("RUST_LOG") => {
            info!("SIGHUP: RUST_LOG is set and keeps deciding the log level")
        }
        Ok(new) => match LOG_FILTER
            .get()
            .map(|h| h.reload(log_filter(&new.log.level, env)))
        {
            Some(Ok(())) => info!(level = %new.log.level, "SIGHUP: log level set"),
            Some(Err(e)) => warn!(error = %e, "SIGHUP: cannot change the log level"),
            None => {}
        },
    }
    let Some(handle) = handle else {
        info!("SIGHUP: still starting; the token is read when uploads begin");
        return;
    };
    match token.load() {
        Ok(t) => {
            handle.api.set_token(t);
            handle.auth_recheck.notify_one();
            match token {
                config::TokenSource::File(p) => {
                    info!(file = %p.display(), "SIGHUP: token re-read")
                }
                config::TokenSource::Inline(_) => {
                    info!("SIGHUP: the token is set in the configuration; restart to change it")
                }
            }
        }
        Err(e) => warn!(error = %e, "SIGHUP: cannot read the token; keeping the current one"),
    }
}
