//! `callferry check-config [--online]`: every check a start would make, each on its own line, so
//! one run shows everything to fix; exit 78 if any failed.

use std::path::{Path, PathBuf};

use super::{EXIT_CONFIG, EXIT_OK};
use crate::app::AppError;
use crate::config::Config;
use crate::queue::{OpenMode, Queue};

pub(super) async fn check_config(cfg: &Config, online: bool) -> Result<i32, AppError> {
    let mut r = Report::default();
    r.ok(format!(
        "config {} parsed",
        cfg.source.as_deref().unwrap_or(Path::new("-")).display()
    ));
    match cfg.api.token.load() {
        Ok(_) => r.ok("API token present".into()),
        Err(e) => r.error(e.to_string()),
    }
    for (i, s) in cfg.sources.iter().enumerate() {
        match s.load_token(i) {
            Some(Ok(_)) => r.ok(format!("source {:?}: its own API token present", s.name)),
            Some(Err(e)) => r.error(e.to_string()),
            None => {}
        }
    }
    watch_paths(&mut r, cfg);
    match &cfg.queue.postgres {
        Some(url) => shared_database(&mut r, url.expose(), cfg.queue.lease).await,
        None => database(&mut r, &cfg.queue.database).await,
    }
    if let Some(dest) = &cfg.after_upload.move_to {
        let dir = existing_ancestor(dest);
        if is_writable_dir(&dir) {
            r.ok(format!("after_upload.move_to {} writable", dest.display()));
        } else {
            r.error(format!(
                "after_upload.move_to {}: {} is not writable",
                dest.display(),
                dir.display()
            ));
        }
    }
    metrics_listen(&mut r, cfg);
    if online && let Ok(token) = cfg.api.token.load() {
        let shown = crate::secret::display_url(&cfg.api.base_url);
        match crate::api::ApiClient::new(cfg, token) {
            Ok(api) => match api.probe_auth().await {
                Ok(()) => r.ok(format!("API {shown} accepts the token")),
                Err(e) => r.error(format!("API {shown}: {e}")),
            },
            Err(e) => r.error(e.to_string()),
        }
        for (i, s) in cfg.sources.iter().enumerate() {
            let Some(Ok(token)) = s.load_token(i) else {
                continue;
            };
            match crate::api::ApiClient::new(cfg, token) {
                Ok(api) => match api.probe_auth().await {
                    Ok(()) => r.ok(format!("API {shown} accepts source {:?}'s token", s.name)),
                    Err(e) => r.error(format!("API {shown}, source {:?}'s token: {e}", s.name)),
                },
                Err(e) => r.error(e.to_string()),
            }
        }
    }
    Ok(if r.errors > 0 { EXIT_CONFIG } else { EXIT_OK })
}

/// One line per check on stdout. A closed stdout does not stop the checks: the exit code still
/// says whether they passed.
#[derive(Default)]
struct Report {
    errors: usize,
}

impl Report {
    fn line(&mut self, tag: &str, msg: &str) {
        use std::io::Write;
        let _ = writeln!(std::io::stdout().lock(), "{tag} {msg}");
    }
    fn ok(&mut self, msg: String) {
        self.line("ok     ", &msg);
    }
    fn warning(&mut self, msg: String) {
        self.line("warning", &msg);
    }
    fn error(&mut self, msg: String) {
        self.errors += 1;
        self.line("error  ", &msg);
    }
}

fn watch_paths(r: &mut Report, cfg: &Config) {
    for p in &cfg.watch.paths {
        match std::fs::read_dir(p) {
            Ok(_) => r.ok(format!("watch path {} readable", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => r.warning(format!(
                "watch path {} does not exist (yet); the daemon waits for it",
                p.display()
            )),
            Err(e) => r.error(format!("watch path {}: {e}", p.display())),
        }
    }
}

/// The PostgreSQL queue: reachable, and its schema brought up to date (as the daemon would).
async fn shared_database(r: &mut Report, url: &str, lease: std::time::Duration) {
    let shown = crate::secret::display_url_text(url);
    match Queue::attach_pg(url, lease).await {
        Ok(q) => {
            r.ok(format!("queue database {shown} (PostgreSQL) usable"));
            q.close().await;
        }
        Err(e) => r.error(format!("queue database {shown} (PostgreSQL): {e}")),
    }
}

async fn database(r: &mut Report, db: &Path) {
    if db.exists() {
        match Queue::open(db, OpenMode::Existing).await {
            Ok(q) => {
                r.ok(format!("queue database {} usable", db.display()));
                q.close().await;
            }
            Err(e) => r.error(e.to_string()),
        }
        return;
    }
    let dir = existing_ancestor(db);
    if is_writable_dir(&dir) {
        r.ok(format!("queue database {} will be created", db.display()));
    } else {
        r.error(format!(
            "queue database {}: cannot create it ({} is not writable)",
            db.display(),
            dir.display()
        ));
    }
}

/// The daemon binds before READY and refuses to start on a taken port: try it here too.
fn metrics_listen(r: &mut Report, cfg: &Config) {
    let Some(addr) = cfg.metrics.listen else {
        return;
    };
    match std::net::TcpListener::bind(addr) {
        Ok(_) => r.ok(format!("metrics.listen {addr} free")),
        Err(e) if crate::queue::DaemonLock::is_held(&cfg.queue.database) == Some(true) => r
            .warning(format!(
                "metrics.listen {addr}: {e} (probably the running daemon's own)"
            )),
        Err(e) => r.error(format!("metrics.listen {addr}: cannot bind: {e}")),
    }
}

fn existing_ancestor(p: &Path) -> PathBuf {
    let mut cur = p
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    while !cur.exists() {
        match cur.parent() {
            Some(parent) => cur = parent.to_path_buf(),
            None => break,
        }
    }
    cur
}

fn is_writable_dir(p: &Path) -> bool {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated path; access(2) only reads it.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}
